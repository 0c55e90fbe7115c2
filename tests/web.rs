//! The read-only HTTP listener (`webserver`) against a real regtest node: `/metrics` scraped with
//! a miner mining and parsed with a Prometheus text parser, every `/api` view, the dashboard's
//! assets, 404 and 405, and no listener at all when `webserver` is absent. Without a node these
//! print "skipped" (locally) or fail (in CI).
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
#[path = "support/scrape.rs"]
mod scrape;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use loadtest::{Miner, MinerConfig, MinerReport};
use node::{RegtestNet, WAIT, bitcoind_or_skip};
use pool::{PoolProcess, btcd_entry, free_port, regtest_config};
use scrape::{get_json, http, metric, scrape};
use serde_json::Value;

/// Mines at 20 shares/s (pausing at each block until the next job) until the pool has accepted
/// at least `shares` of them and found a block, then stops.
fn mine_shares(pool: &PoolProcess, user: &str, shares: u64) -> MinerReport {
    let mut cfg = MinerConfig::new(pool.addr, user);
    cfg.max_shares_per_sec = 20.0;
    cfg.pause_after_block = true;
    cfg.duration = Some(Duration::from_secs(120));
    let miner = Miner::start(cfg).unwrap();
    node::wait_until("the miner to get shares accepted and a block", WAIT, || {
        let r = miner.report();
        r.accepted >= shares && r.blocks_accepted >= 1
    });
    miner.stop()
}

#[test]
fn metrics_and_api_show_what_the_miner_did() {
    let Some(exe) = bitcoind_or_skip("metrics_and_api_show_what_the_miner_did") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let mut config = regtest_config(
        vec![btcd_entry(node)],
        Some(&node.new_address()),
        free_port(),
    );
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config["webserver"] = web.to_string().into();
    let zmq = node.zmq_endpoint().expect("node 0 publishes hashblock");
    config["zmqblock"] = zmq.into();
    let pool = PoolProcess::start("web", &config, &["-L"]);

    let report = mine_shares(&pool, "webuser.rig1", 10);
    assert!(report.error.is_none(), "{report:?}");
    assert!(report.blocks_accepted >= 1, "{report:?}");
    assert!(report.accepted >= 10, "{report:?}");

    // The miner has stopped: the pool's counters settle on the miner's.
    let deadline = Instant::now() + WAIT;
    let m = loop {
        let m = scrape(web);
        let acc = metric(&m, "ckpool_shares_total", &[("result", "accepted")]);
        let rej = metric(&m, "ckpool_shares_total", &[("result", "rejected")]);
        if acc == Some(report.accepted as f64) && rej == Some(report.rejected as f64) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "share counters {acc:?}/{rej:?} never matched the miner's {report:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let blocks = get_json(web, "/api/blocks");
    let found = blocks["count"].as_u64().unwrap();
    assert!(found >= 1, "{blocks}");
    assert_eq!(
        metric(&m, "ckpool_blocks_found_total", &[]),
        Some(found as f64)
    );
    // Each found block is settled by the node's verdict: accepted ones are in its chain.
    let in_chain = blocks["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| {
            node.try_rpc("getblockheader", serde_json::json!([h]))
                .is_ok_and(|b| b["confirmations"].as_i64().is_some_and(|c| c >= 1))
        })
        .count();
    assert!(in_chain >= 1, "{blocks}");
    node::wait_until("every found block to be settled", WAIT, || {
        let m = scrape(web);
        metric(&m, "ckpool_blocks_settled_total", &[]) == Some(found as f64)
            && metric(
                &m,
                "ckpool_blocks_settled_total",
                &[("verdict", "accepted")],
            ) == Some(in_chain as f64)
    });
    // The node announced at least the pool's own blocks over ZMQ.
    node::wait_until("a ZMQ hashblock to be counted", WAIT, || {
        metric(&scrape(web), "ckpool_zmq_hashblock_total", &[]).is_some_and(|n| n >= 1.0)
    });
    assert!(metric(&m, "ckpool_accepted_difficulty_total", &[]).unwrap() > 0.0);
    assert!(metric(&m, "ckpool_connections_accepted_total", &[]).unwrap() >= 1.0);
    assert_eq!(metric(&m, "ckpool_connector_threads", &[]), Some(2.0));
    assert!(metric(&m, "ckpool_connections_closed_total", &[("reason", "peer")]).is_some());
    for w in ["1m", "5m", "15m", "1h", "6h", "1d", "7d"] {
        assert!(
            metric(&m, "ckpool_hashrate", &[("window", w)]).is_some(),
            "no {w} hashrate"
        );
    }
    assert_eq!(
        metric(&m, "ckpool_bitcoind_active", &[("server", "0")]),
        Some(1.0)
    );
    assert_eq!(metric(&m, "ckpool_users", &[]), Some(1.0));
    assert_eq!(metric(&m, "ckpool_workers", &[]), Some(1.0));
    assert!(metric(&m, "ckpool_sharelog_backlog", &[]).is_some());

    // Every judged share was timed, once.
    assert_eq!(
        metric(&m, "ckpool_submit_seconds_count", &[]),
        Some((report.accepted + report.rejected) as f64)
    );
    let sum = metric(&m, "ckpool_submit_seconds_sum", &[]).unwrap();
    assert!(sum > 0.0 && sum < 60.0, "submit latency sum {sum}");
    // The node's side: a fresh template, timed RPC calls and template fetches.
    let age = metric(&m, "ckpool_template_age_seconds", &[]).expect("a template age");
    assert!(
        (0.0..=60.0).contains(&age),
        "template age {age} s (update_interval is 30 s)"
    );
    assert!(metric(&m, "ckpool_templates_total", &[]).unwrap() >= 1.0);
    assert!(metric(&m, "ckpool_template_fetch_seconds_count", &[]).unwrap() >= 1.0);
    for method in ["getblocktemplate", "getblockchaininfo", "submitblock"] {
        let n = metric(
            &m,
            "ckpool_bitcoind_rpc_seconds_count",
            &[("method", method)],
        );
        assert!(n.is_some_and(|n| n >= 1.0), "{method}: {n:?} calls timed");
    }
    assert_eq!(
        metric(&m, "ckpool_bitcoind_failovers_total", &[]),
        Some(0.0)
    );
    assert_eq!(metric(&m, "ckpool_passthrough_links", &[]), Some(0.0));
    assert_eq!(
        metric(&m, "ckpool_handovers_total", &[("result", "received")]),
        Some(0.0)
    );

    // The JSON views.
    let p = get_json(web, "/api/pool");
    assert_eq!(p["accepted"], report.accepted);
    assert_eq!(p["rejected"], report.rejected);
    assert_eq!(p["users"], 1);
    assert_eq!(p["workers"], 1);
    assert_eq!(p["server"], 0);
    assert!(p["hashrate1m"].is_number(), "{p}");
    assert!(p["sharelog"]["written"].is_number(), "{p}");
    let users = get_json(web, "/api/users");
    assert_eq!(users["webuser"]["accepted"], report.accepted);
    assert_eq!(users["webuser"]["workers"], 1);
    let user = get_json(web, "/api/users/webuser");
    assert_eq!(user["workers"]["webuser.rig1"]["accepted"], report.accepted);
    let workers = get_json(web, "/api/workers");
    assert_eq!(workers["webuser.rig1"]["user"], "webuser");
    let worker = get_json(web, "/api/workers/webuser%2Erig1");
    assert_eq!(worker["accepted"], report.accepted);
    assert_eq!(worker["worker"], "webuser.rig1");
    assert!(worker["lastshare"].as_u64().unwrap() > 0, "{worker}");
    assert!(
        blocks["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == &Value::from(report.block_hashes[0].clone())),
        "{blocks}"
    );
    let ups = get_json(web, "/api/upstreams");
    assert_eq!(ups["servers"][0]["active"], true);
    assert_eq!(
        ups["servers"][0]["url"],
        node.rpc_url().trim_start_matches("http://")
    );
    let clients = get_json(web, "/api/clients");
    assert_eq!(clients["threads"].as_array().unwrap().len(), 2);
    let accepted: u64 = clients["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["accepted"].as_u64().unwrap())
        .sum();
    assert!(accepted >= 1, "{clients}");
    let history = get_json(web, "/api/history");
    assert!(
        !history["points"].as_array().unwrap().is_empty(),
        "{history}"
    );

    // The dashboard and its assets, built in.
    let (status, page) = http(web, "GET", "/");
    assert_eq!(status, 200);
    assert!(page.contains("/assets/uPlot.iife.min.js"), "{page}");
    let (status, js) = http(web, "GET", "/assets/uPlot.iife.min.js");
    assert_eq!(status, 200);
    assert!(js.contains("uPlot"));
    assert_eq!(http(web, "GET", "/assets/dashboard.js").0, 200);

    // Unknown paths and names, other methods.
    assert_eq!(http(web, "GET", "/nope").0, 404);
    assert_eq!(http(web, "GET", "/api/nope").0, 404);
    assert_eq!(http(web, "GET", "/api/users/nobody").0, 404);
    assert_eq!(http(web, "GET", "/api/workers/nobody.rig").0, 404);
    assert_eq!(http(web, "HEAD", "/api/pool"), (200, String::new()));
    let long = format!("/api/users/{}", "x".repeat(2000));
    assert_eq!(http(web, "GET", &long).0, 414);
    assert_eq!(http(web, "POST", "/api/pool").0, 405);
    assert_eq!(http(web, "DELETE", "/metrics").0, 405);
}

/// `-H` with `webserver` set: the old instance holds the port until it has stopped, so the new
/// one waits for it rather than failing (and dropping the miners it has just taken over); it then
/// serves `/metrics`, which counts the handover it received.
#[test]
fn a_handover_moves_the_webserver_and_counts_itself() {
    let Some(exe) = bitcoind_or_skip("a_handover_moves_the_webserver_and_counts_itself") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let mut config = regtest_config(
        vec![btcd_entry(node)],
        Some(&node.new_address()),
        free_port(),
    );
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config["webserver"] = web.to_string().into();
    let mut old = PoolProcess::start("webho", &config, &[]);
    let m = scrape(web);
    assert_eq!(
        metric(&m, "ckpool_handovers_total", &[("result", "received")]),
        Some(0.0)
    );
    // A miner connected across the handover.
    let mut miner = pool::Client::connect(old.addr);
    miner.login("webho.rig");

    let mut new = old.spawn_sibling(&["-H"], &[], "new.log");
    let status = old.wait_exit(WAIT).unwrap_or_else(|| {
        panic!(
            "the old instance did not hand over: {}\nnew: {}",
            old.log_text(),
            new.log_text()
        )
    });
    assert!(status.success(), "old instance: {status:?}");
    node::wait_until("the new instance to serve /metrics", WAIT, || {
        assert!(
            new.is_running(),
            "the new instance exited: {}",
            new.log_text()
        );
        TcpStream::connect(web).is_ok()
            && metric(
                &scrape(web),
                "ckpool_handovers_total",
                &[("result", "received")],
            ) == Some(1.0)
    });
    let m = scrape(web);
    assert_eq!(
        metric(&m, "ckpool_clients", &[]),
        Some(1.0),
        "the miner moved"
    );
    assert!(new.is_running(), "{}", new.log_text());
}

/// The pool process's listening TCP sockets (its fds matched against `/proc/net/tcp*`).
fn listening_sockets(pid: u32) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // State 0A is LISTEN; column 9 is the inode.
            if cols.get(3) == Some(&"0A") {
                inodes.insert(cols[9].to_owned());
            }
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .filter(|i| inodes.contains(i))
        .count()
}

#[test]
fn without_webserver_only_the_stratum_port_listens() {
    let Some(exe) = bitcoind_or_skip("without_webserver_only_the_stratum_port_listens") else {
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let config = regtest_config(
        vec![btcd_entry(node)],
        Some(&node.new_address()),
        free_port(),
    );
    let pool = PoolProcess::start("noweb", &config, &[]);
    let pid: u32 = std::fs::read_to_string(pool.sockdir.join("main.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // One stratum listener (shared by the connector threads through SO_REUSEPORT or not).
    let n = listening_sockets(pid);
    assert!(n >= 1, "the stratum port does not listen");
    let mut with_web = config.clone();
    with_web["webserver"] = format!("127.0.0.1:{}", free_port()).into();
    with_web["serverurl"] = serde_json::json!([format!("127.0.0.1:{}", free_port())]);
    let pool2 = PoolProcess::start("withweb", &with_web, &[]);
    let pid2: u32 = std::fs::read_to_string(pool2.sockdir.join("main.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The same configuration plus `webserver` listens on exactly one more socket.
    assert_eq!(listening_sockets(pid2), n + 1);
    assert!(!pool.log_text().contains("web server listening"));
    assert!(pool2.log_text().contains("web server listening"));
}

/// The dashboard in headless Chromium: the worker table lists the miner and the chart has
/// points. Skipped (with a note) when `chromium` is not installed; under `CI=true` (where `.ci/run`
/// installs it) a missing browser fails the test.
#[test]
fn dashboard_lists_the_worker_and_charts_the_hashrate() {
    let Some(exe) = bitcoind_or_skip("dashboard_lists_the_worker_and_charts_the_hashrate") else {
        return;
    };
    let chromium = ["chromium", "chromium-browser"].into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(chromium) = chromium else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true and no chromium: .ci/run installs it"
        );
        println!("dashboard_lists_the_worker_and_charts_the_hashrate: skipped, no chromium");
        return;
    };
    let net = RegtestNet::start(&exe, 2);
    let node = &net.nodes[0];
    let mut config = regtest_config(
        vec![btcd_entry(node)],
        Some(&node.new_address()),
        free_port(),
    );
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config["webserver"] = web.to_string().into();
    let pool = PoolProcess::start("webdash", &config, &[]);
    let report = mine_shares(&pool, "dashuser.rig7", 5);
    assert!(report.accepted >= 5, "{report:?}");

    let profile = pool.dir.join("chromium-profile");
    let dom_path = pool.dir.join("dom.html");
    let err_path = pool.dir.join("chromium.err");
    let started = Instant::now();
    let mut child = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
            // On a loaded machine the virtual clock was seen to take minutes to run its 5 s
            // (chromium idle, the page's requests answered): stop in real time as well and
            // dump what the page shows by then (its first refresh takes well under a second).
            "--timeout=30000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("http://{web}/"))
        .stdout(std::fs::File::create(&dom_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish in 120 s: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("chromium took {:?}", started.elapsed());
    let dom = std::fs::read_to_string(&dom_path).unwrap();
    assert!(
        status.success(),
        "chromium failed: {}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    let workers = dom
        .split("id=\"workers\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or_else(|| panic!("no worker table in {dom}"));
    assert!(workers.contains("dashuser.rig7"), "{workers}");
    let points: usize = dom
        .split("data-points=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the chart has no points: {dom}"));
    assert!(points >= 1, "{dom}");
    assert!(dom.contains("uplot"), "uPlot did not draw: {dom}");
}
