//! ckpool's admin commands on `<sockdir>/listener`, end to end against a real regtest node with
//! raw stratum clients and a ckload miner: replies byte-equal to ckpool 0.9.9's where the
//! capture (`testdata/ckpool-0.9.9-admin.jsonl`) has them, client commands acting on exactly the
//! clients named, accept gating, `resetshares`, the JSON queries, and the socket directory's
//! mode and ownership rules. Without a node the pool tests print "skipped" (locally) or fail
//! (in CI).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs,
    reason = "test code"
)]

#[path = "support/node.rs"]
mod node;
#[path = "support/pool.rs"]
mod pool;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use loadtest::{Miner, MinerConfig};
use node::{RegtestNet, RegtestNode, WAIT, bitcoind_or_skip, wait_until};
use pool::{Client, PoolProcess, btcd_entry, free_port, regtest_config, temp_dir};
use serde_json::{Value, json};

/// ckpool 0.9.9's replies on its listener socket, from the capture.
fn capture() -> Vec<(String, Option<String>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata/ckpool-0.9.9-admin.jsonl");
    let path = if path.exists() {
        path
    } else {
        PathBuf::from("/work/shared/testdata/ckpool-0.9.9-admin.jsonl")
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["socket"] == "listener")
        .map(|v| {
            (
                v["request"].as_str().unwrap().to_owned(),
                v["response"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// `text` with every run of digits made `0`: the shape of a JSON reply.
fn shape(text: &str) -> String {
    let mut out = String::new();
    let mut in_digits = false;
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            if !in_digits {
                out.push('0');
            }
            in_digits = true;
        } else {
            out.push(ch);
            in_digits = false;
        }
    }
    out
}

fn json_of(pool: &PoolProcess, cmd: &str) -> Value {
    let text = pool.admin(cmd).unwrap_or_else(|| panic!("{cmd}: no reply"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{cmd}: {e}: {text}"))
}

/// A request on `<sockdir>/<socket>`: the reply, `None` when it closed with none.
fn ask(pool: &PoolProcess, socket: &str, cmd: &str) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(pool.sockdir.join(socket)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    common::admin::write_message(&mut s, cmd.as_bytes()).unwrap();
    let reply = common::admin::read_message(&mut s).unwrap()?;
    Some(String::from_utf8_lossy(&reply).into_owned())
}

/// The `clients` entry of the client authorised as `worker`.
fn client_of(pool: &PoolProcess, worker: &str) -> Option<Value> {
    json_of(pool, "clients")["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["worker"] == worker)
        .cloned()
}

/// Reads until the server closes the connection; the lines seen on the way.
fn read_to_close(c: &mut Client) -> Vec<Value> {
    let end = Instant::now() + WAIT;
    while Instant::now() < end {
        if c.read_line().is_err() {
            return c.seen.clone();
        }
    }
    panic!("the connection stayed open; seen {:?}", c.seen);
}

fn reconnects(seen: &[Value]) -> Vec<&Value> {
    seen.iter()
        .filter(|v| v["method"] == "client.reconnect")
        .collect()
}

fn start_pool(node: &RegtestNode, tag: &str, flags: &[&str]) -> PoolProcess {
    let addr = node.new_address();
    let mut config = regtest_config(vec![btcd_entry(node)], Some(&addr), free_port());
    // Vardiff would soon give a fast miner a difficulty above regtest's network difficulty
    // (2^-31), making every share a block; held at 2^-32, half the shares are not.
    config["maxdiff"] = config["mindiff"].clone();
    PoolProcess::start(tag, &config, flags)
}

/// ckpool's own replies, byte for byte, and the shape of `connectorstats`; `accept`/`reject`
/// gate new connections; the socket directory and socket have mode 0770 (and, as root, the
/// `-g` group).
#[test]
fn replies_as_ckpool_and_accept_gating() {
    let Some(exe) = bitcoind_or_skip("replies_as_ckpool_and_accept_gating") else {
        return;
    };
    // Two nodes: a lone regtest node says it is not connected and gives no template.
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let root = rustix::process::geteuid().is_root();
    // As root, `-g` with nogroup's id: the directory and socket must carry it.
    let flags: &[&str] = if root { &["-g", "65534"] } else { &[] };
    let pool = start_pool(node, "adminreplies", flags);

    let captured = capture();
    for (req, resp) in &captured {
        let ours = pool.admin(req);
        match req.as_str() {
            // Byte-equal where ours is ckpool's command.
            "ping" | "loglevel=5" | "unknowncmd" => {
                assert_eq!(ours.as_deref(), resp.as_deref(), "{req}");
            }
            // Same keys, order and spacing; only the numbers differ.
            "connectorstats" => {
                let ours = ours.expect("connectorstats reply");
                assert_eq!(shape(&ours), shape(resp.as_deref().unwrap()), "{ours}");
            }
            // ckpool answers `unknown` (or nothing, the API stubs): ours answers JSON.
            "users" | "workers" | "clients" | "poolstats" | "uptime" => {
                let text = ours.unwrap_or_else(|| panic!("{req}: no reply"));
                assert!(
                    serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object()),
                    "{req}: {text}"
                );
            }
            _ => {}
        }
    }
    assert_eq!(pool.admin("loglevel=7").as_deref(), Some("success"));

    // The stratifier, connector and generator sockets, as ckpool's processes of those names.
    for socket in ["stratifier", "connector", "generator"] {
        assert_eq!(
            ask(&pool, socket, "ping").as_deref(),
            Some("pong"),
            "{socket}"
        );
        // No reply, as ckpool's.
        assert_eq!(ask(&pool, socket, "loglevel=7"), None, "{socket}");
        // The listener's own commands are not theirs.
        assert_eq!(
            ask(&pool, socket, "shutdown").as_deref(),
            Some("unknown"),
            "{socket}"
        );
    }
    let connector_stats = captured
        .iter()
        .find(|(r, _)| r == "connectorstats")
        .and_then(|(_, s)| s.clone())
        .unwrap();
    let ours = ask(&pool, "connector", "stats").unwrap();
    assert_eq!(shape(&ours), shape(&connector_stats), "{ours}");
    let stats: Value = serde_json::from_str(&ask(&pool, "stratifier", "stats").unwrap()).unwrap();
    assert!(stats["accepted"].is_u64(), "{stats}");
    assert!(ask(&pool, "stratifier", "users").is_some_and(|u| u.starts_with('{')));
    assert_eq!(ask(&pool, "stratifier", "dropall"), None);
    assert_eq!(pool.admin("ping").as_deref(), Some("pong"));

    // The socket directory and the socket: mode 0770, and the -g group.
    let dir = std::fs::metadata(&pool.sockdir).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o770);
    let sock = std::fs::metadata(pool.sockdir.join("listener")).unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o770);
    if root {
        assert_eq!(dir.gid(), 65534);
        assert_eq!(sock.gid(), 65534);
    }

    // A client connected before `reject` is still served; a new one is held until `accept`.
    let mut before = Client::connect(pool.addr);
    before.login("gate.before");
    assert_eq!(pool.admin("reject").as_deref(), Some("rejecting"));
    let mut held = Client::connect(pool.addr);
    held.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["held/1"]}));
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        assert!(
            matches!(held.read_line(), Ok(None)),
            "a connection made after reject was served: {:?}",
            held.seen
        );
    }
    before.send(&json!({"id": 7, "method": "mining.suggest_difficulty", "params": [1]}));
    before.send(&json!({"id": 8, "method": "mining.subscribe", "params": ["again/1"]}));
    assert!(before.reply(8)["result"].is_array(), "{:?}", before.seen);
    assert_eq!(pool.admin("accept").as_deref(), Some("accepting"));
    assert!(held.reply(1)["result"].is_array(), "{:?}", held.seen);
}

/// `dropclient` drops exactly that client, `reconnclient` and `reconnect[:url,port]` send
/// `client.reconnect` (empty params, or those), `dropall` drops everyone, the JSON queries list
/// the clients, users and workers with the figures set up, and `resetshares` zeroes the best
/// shares of the round (ckpool's meaning) while the best ever stays.
#[test]
fn client_commands_queries_and_resetshares() {
    let Some(exe) = bitcoind_or_skip("client_commands_queries_and_resetshares") else {
        return;
    };
    // Two nodes: a lone regtest node says it is not connected and gives no template.
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let pool = start_pool(node, "adminclients", &[]);

    // Shares for one user, so users/workers/getuser/getworker/poolstats have figures. On
    // regtest about half the shares are blocks, and a block starts a new round whose best share
    // leaves the block's out: mine until the round has a best share with the miner stopped.
    let mut accepted = 0;
    for attempt in 0.. {
        assert!(attempt < 10, "no round with a best share after 10 miners");
        let mut cfg = MinerConfig::new(pool.addr, "carol.rig");
        cfg.duration = Some(Duration::from_secs(60));
        cfg.max_shares_per_sec = 20.0;
        let miner = Miner::start(cfg).unwrap();
        wait_until("carol's shares and a best share in the round", WAIT, || {
            miner.report().accepted >= 3
                && json_of(&pool, "poolstats")["bestshare"].as_f64().unwrap() > 0.0
        });
        accepted += miner.stop().accepted;
        // A block may have come since (a new round): then again.
        if json_of(&pool, "poolstats")["bestshare"].as_f64().unwrap() > 0.0 {
            break;
        }
    }

    let mut a = Client::connect(pool.addr);
    a.login("alice.one");
    let mut b = Client::connect(pool.addr);
    b.login("bob.two");
    let mut c = Client::connect(pool.addr);
    c.login("carl.three");

    // clients / getclient.
    let clients = json_of(&pool, "clients");
    assert!(clients["count"].as_u64().unwrap() >= 3, "{clients}");
    assert_eq!(clients["max"], 1000);
    let ca = client_of(&pool, "alice.one").expect("alice listed");
    assert_eq!(ca["user"], "alice");
    assert_eq!(
        ca["address"].as_str().unwrap(),
        a.stream.local_addr().unwrap().to_string()
    );
    let id_a = ca["id"].as_u64().unwrap();
    let id_b = client_of(&pool, "bob.two").expect("bob listed")["id"]
        .as_u64()
        .unwrap();
    let got = json_of(&pool, &format!("getclient={{\"id\":{id_b}}}"));
    assert_eq!(got["client"]["worker"], "bob.two", "{got}");
    // An id naming no connector thread.
    let none = json_of(&pool, &format!("getclient={{\"id\":{}}}", u64::MAX));
    assert!(none["error"].is_string(), "{none}");
    let uc = json_of(&pool, "userclients={\"user\":\"alice\"}");
    assert_eq!(uc["count"], 1, "{uc}");
    assert_eq!(uc["clients"][0]["id"], id_a);

    // users / workers / getuser / getworker / poolstats / uptime.
    let users = json_of(&pool, "users");
    assert!(users["users"]["carol"].is_object(), "{users}");
    assert_eq!(users["users"]["carol"]["accepted"], accepted, "{users}");
    let workers = json_of(&pool, "workers");
    assert_eq!(
        workers["workers"]["carol.rig"]["accepted"], accepted,
        "{workers}"
    );
    let user = json_of(&pool, "getuser={\"user\":\"carol\"}");
    assert_eq!(user["user"], "carol");
    assert_eq!(user["workers"]["carol.rig"]["accepted"], accepted, "{user}");
    assert!(json_of(&pool, "getuser={\"user\":\"nobody\"}")["error"].is_string());
    let worker = json_of(&pool, "getworker={\"worker\":\"carol.rig\"}");
    assert_eq!(worker["accepted"], accepted, "{worker}");
    let stats = json_of(&pool, "poolstats");
    assert_eq!(stats["accepted"], accepted, "{stats}");
    assert!(stats["bestshare"].as_f64().unwrap() > 0.0, "{stats}");
    assert!(json_of(&pool, "uptime")["uptime"].is_u64());

    // resetshares: ckpool's reply; the round's best shares are zero, the best ever stays.
    assert_eq!(pool.admin("resetshares").as_deref(), Some("resetting"));
    let stats = json_of(&pool, "poolstats");
    assert_eq!(stats["bestshare"].as_f64(), Some(0.0), "{stats}");
    assert!(stats["bestever"].as_f64().unwrap() > 0.0, "{stats}");
    let worker = json_of(&pool, "getworker={\"worker\":\"carol.rig\"}");
    assert_eq!(worker["bestshare"].as_f64(), Some(0.0), "{worker}");

    // dropclient: no reply (as ckpool); alice is closed with no reconnect, bob and carl stay.
    assert_eq!(pool.admin(&format!("dropclient={id_a}")), None);
    let seen = read_to_close(&mut a);
    assert!(reconnects(&seen).is_empty(), "{seen:?}");
    wait_until("alice gone from clients", WAIT, || {
        client_of(&pool, "alice.one").is_none()
    });
    assert!(client_of(&pool, "bob.two").is_some());
    assert!(client_of(&pool, "carl.three").is_some());

    // reconnclient: bob gets client.reconnect with empty params, then is closed.
    assert_eq!(pool.admin(&format!("reconnclient={id_b}")), None);
    let seen = read_to_close(&mut b);
    let r = reconnects(&seen);
    assert_eq!(r.len(), 1, "{seen:?}");
    assert_eq!(r[0]["params"], json!([]));
    assert!(client_of(&pool, "carl.three").is_some());

    // A bad argument is refused and changes nothing.
    assert_eq!(pool.admin("reconnect:nowhere").as_deref(), Some("Invalid"));
    assert_eq!(pool.admin("dropclient=x"), None);
    assert!(client_of(&pool, "carl.three").is_some());

    // reconnect:url,port: every client gets client.reconnect with those params.
    let mut d = Client::connect(pool.addr);
    d.login("dave.four");
    assert_eq!(
        pool.admin("reconnect:pool.example.com,3334").as_deref(),
        Some("reconnecting")
    );
    for cl in [&mut c, &mut d] {
        let seen = read_to_close(cl);
        let r = reconnects(&seen);
        assert_eq!(r.len(), 1, "{seen:?}");
        assert_eq!(r[0]["params"], json!(["pool.example.com", 3334]));
    }

    // dropall: everyone is closed, no reconnect sent; plain reconnect has empty params.
    let mut e = Client::connect(pool.addr);
    e.login("eve.five");
    let mut f = Client::connect(pool.addr);
    f.login("fred.six");
    assert_eq!(pool.admin("reconnect").as_deref(), Some("reconnecting"));
    let seen = read_to_close(&mut e);
    assert_eq!(reconnects(&seen)[0]["params"], json!([]), "{seen:?}");
    let mut g = Client::connect(pool.addr);
    g.login("gina.seven");
    assert_eq!(pool.admin("dropall"), None);
    let seen = read_to_close(&mut g);
    assert!(reconnects(&seen).is_empty(), "{seen:?}");
    let _ = read_to_close(&mut f);
    wait_until("no clients left", WAIT, || {
        json_of(&pool, "clients")["count"] == 0
    });
}

/// A socket directory that exists and belongs to another user is refused with exit code 2 and
/// a clear message (as root: a directory chowned to nobody). Needs no node: the refusal comes
/// before anything is contacted.
#[test]
fn foreign_socket_directory_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("foreign_socket_directory_is_refused: skipped (needs root to chown)");
        return;
    }
    let dir = temp_dir("foreignsock");
    let sockdir = dir.join("sock");
    std::fs::create_dir(&sockdir).unwrap();
    std::os::unix::fs::chown(&sockdir, Some(65534), Some(65534)).unwrap();
    let cfg = dir.join("ckpool.conf");
    let config = regtest_config(
        vec![json!({"url": "127.0.0.1:1", "auth": "u", "pass": "p"})],
        Some("bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"),
        free_port(),
    );
    std::fs::write(&cfg, config.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ckpool-rs"))
        .arg("-c")
        .arg(&cfg)
        .arg("-s")
        .arg(&sockdir)
        .arg("-n")
        .arg("foreignsock")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
    // Nothing was created in it.
    assert_eq!(std::fs::read_dir(&sockdir).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every admin command of the listener through the `ckpmsg` binary (commands on stdin, one per
/// line, as an operator's script sends them): each gets its documented reply, and the JSON
/// queries hold the figures this test set up (one miner's accepted shares, one raw client).
/// `restart` and `handover` are exercised in tests/handover.rs; `shutdown` goes last here and
/// the pool exits 0.
#[test]
fn ckpmsg_round_trips_every_admin_command() {
    let Some(exe) = bitcoind_or_skip("ckpmsg_round_trips_every_admin_command") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let mut pool = start_pool(node, "adminckpmsg", &[]);

    let mut cfg = MinerConfig::new(pool.addr, "dave.rig");
    cfg.duration = Some(Duration::from_secs(60));
    cfg.max_shares_per_sec = 20.0;
    let miner = Miner::start(cfg).unwrap();
    wait_until("dave's shares", WAIT, || miner.report().accepted >= 3);
    let accepted = miner.stop().accepted;
    wait_until("dave's shares counted", WAIT, || {
        json_of(&pool, "poolstats")["accepted"].as_u64() == Some(accepted)
    });
    let mut raw = Client::connect(pool.addr);
    raw.login("erin.box");
    let id = client_of(&pool, "erin.box").expect("erin listed")["id"]
        .as_u64()
        .unwrap();

    let commands = [
        "ping".to_owned(),
        "stats".to_owned(),
        "poolstats".to_owned(),
        "users".to_owned(),
        "workers".to_owned(),
        "getuser={\"user\":\"dave\"}".to_owned(),
        "getworker={\"worker\":\"dave.rig\"}".to_owned(),
        "clients".to_owned(),
        format!("getclient={{\"id\":{id}}}"),
        "userclients={\"user\":\"erin\"}".to_owned(),
        "workerclients={\"worker\":\"erin.box\"}".to_owned(),
        "connectorstats".to_owned(),
        "uptime".to_owned(),
        "update".to_owned(),
        "loglevel=6".to_owned(),
        "loglevel=9".to_owned(),
        "reject".to_owned(),
        "accept".to_owned(),
        "reconnect:not-a-url".to_owned(),
        "resetshares".to_owned(),
        format!("reconnclient={}", u64::MAX),
        format!("dropclient={}", u64::MAX),
        "nosuchcommand".to_owned(),
        format!("dropclient={id}"),
        "dropall".to_owned(),
        "reconnect".to_owned(),
        "shutdown".to_owned(),
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_ckpmsg"))
        .arg("-s")
        .arg(&pool.sockdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "# every command, one per line").unwrap();
        for c in &commands {
            writeln!(stdin, "{c}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ckpmsg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Vec<&str> = text.lines().collect();
    assert_eq!(replies.len(), commands.len(), "{text}");
    let reply = |cmd: &str| -> &str {
        let i = commands.iter().position(|c| c == cmd).unwrap();
        replies[i]
    };
    let json = |cmd: &str| -> Value {
        serde_json::from_str(reply(cmd)).unwrap_or_else(|e| panic!("{cmd}: {e}: {text}"))
    };

    assert_eq!(reply("ping"), "pong");
    assert_eq!(json("stats")["accepted"], accepted, "{text}");
    assert_eq!(json("poolstats")["accepted"], accepted, "{text}");
    assert_eq!(json("users")["users"]["dave"]["accepted"], accepted);
    assert_eq!(json("workers")["workers"]["dave.rig"]["accepted"], accepted);
    let user = json("getuser={\"user\":\"dave\"}");
    assert_eq!(user["workers"]["dave.rig"]["accepted"], accepted, "{user}");
    let worker = json("getworker={\"worker\":\"dave.rig\"}");
    assert!(
        worker
            .to_string()
            .contains(&format!("\"accepted\":{accepted}")),
        "{worker}"
    );
    let clients = json("clients");
    assert!(
        clients["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["worker"] == "erin.box" && c["id"] == id),
        "{clients}"
    );
    assert_eq!(
        json(&format!("getclient={{\"id\":{id}}}"))["client"]["worker"],
        "erin.box"
    );
    assert_eq!(json("userclients={\"user\":\"erin\"}")["count"], 1);
    assert_eq!(json("workerclients={\"worker\":\"erin.box\"}")["count"], 1);
    assert!(json("connectorstats")["clients"]["count"].as_u64().unwrap() >= 1);
    assert!(json("uptime")["uptime"].is_u64(), "{text}");
    assert_eq!(reply("update"), "updating");
    assert_eq!(reply("loglevel=6"), "success");
    assert_eq!(reply("loglevel=9"), "Invalid");
    assert_eq!(reply("reject"), "rejecting");
    assert_eq!(reply("accept"), "accepting");
    assert_eq!(reply("reconnect:not-a-url"), "Invalid");
    assert_eq!(reply("resetshares"), "resetting");
    assert_eq!(reply(&format!("reconnclient={}", u64::MAX)), "(no reply)");
    assert_eq!(reply(&format!("dropclient={}", u64::MAX)), "(no reply)");
    assert_eq!(reply("nosuchcommand"), "unknown");
    assert_eq!(reply(&format!("dropclient={id}")), "(no reply)");
    assert_eq!(reply("dropall"), "(no reply)");
    assert_eq!(reply("reconnect"), "reconnecting");
    assert_eq!(reply("shutdown"), "exiting");
    // The commands acted: erin was dropped, and the pool stops as on SIGTERM.
    assert!(raw.wait_closed(WAIT), "erin's connection stayed open");
    let status = pool.wait_exit(WAIT).expect("the pool exits after shutdown");
    assert!(status.success(), "{status}");
}
