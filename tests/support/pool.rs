//! Runs the real `ckpool-rs` binary for integration tests, and a raw stratum client.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different part of this module"
)]
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test support"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::node::{RPC_PASS, RPC_USER, RegtestNode, WAIT, wait_until};

/// A running ckpool-rs.
pub struct PoolProcess {
    child: Child,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub sockdir: PathBuf,
    pub log: PathBuf,
    /// The `-n` name and the config file, for a second instance of the same pool.
    name: String,
    cfg_path: PathBuf,
    /// Another instance's directory: left in place on drop.
    borrowed_dir: bool,
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh temp directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ckpool-rs-test-{tag}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(free_port())
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `btcd` config entry for a node.
pub fn btcd_entry(node: &RegtestNode) -> Value {
    json!({"url": node.rpc_url().trim_start_matches("http://"), "auth": RPC_USER, "pass": RPC_PASS})
}

/// A pool config for regtest: every hash is a share (difficulty 2^-32).
pub fn regtest_config(btcd: Vec<Value>, btcaddress: Option<&str>, port: u16) -> Value {
    let mut c = json!({
        "btcd": btcd,
        "btcsig": "/ckpool-rs test/",
        "serverurl": [format!("127.0.0.1:{port}")],
        "mindiff": 0.00000000023283064365386963,
        "startdiff": 0.00000000023283064365386963,
        "blockpoll": 100,
        "update_interval": 30,
        "zmqblock": null,
        "threads": 2,
    });
    if let Some(a) = btcaddress {
        c["btcaddress"] = json!(a);
    }
    c
}

impl PoolProcess {
    /// Starts the pool with `config` and extra flags; waits until it answers `ping` and accepts
    /// stratum connections.
    pub fn start(tag: &str, config: &Value, flags: &[&str]) -> Self {
        Self::start_with_env(tag, config, flags, &[])
    }

    /// [`PoolProcess::start`] with extra environment variables.
    pub fn start_with_env(tag: &str, config: &Value, flags: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = temp_dir(tag);
        let cfg_path = dir.join("ckpool.conf");
        std::fs::write(&cfg_path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        let sockdir = dir.join("sock");
        let log = dir.join("pool.log");
        let port: u16 = config["serverurl"][0]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckpool-rs"));
        cmd.arg("-c")
            .arg(&cfg_path)
            .arg("-s")
            .arg(&sockdir)
            .arg("-n")
            .arg(tag)
            .arg("-l")
            .arg("7");
        cmd.args(flags);
        // The environment is inherited, so POOL_BACKEND and POOL_HANDOFF reach the pool: the
        // whole suite reruns with another backend or handoff (flags given here still win).
        cmd.env("RUST_LOG", "debug");
        cmd.envs(env.iter().copied());
        cmd.current_dir(&dir);
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = cmd.spawn().unwrap();
        let mut p = Self {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            sockdir,
            log,
            name: tag.to_owned(),
            cfg_path,
            borrowed_dir: false,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!(
                    "pool exited with {status} during start-up; log:\n{}",
                    p.log_text()
                );
            }
            if p.admin("ping").as_deref() == Some("pong") && TcpStream::connect(p.addr).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pool did not start; log:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// Starts a second instance of this pool (same config, socket directory and name) with
    /// `flags` (e.g. `-H`) and `env`, logging to `log_name` in the same directory; does not
    /// wait for it. Its drop leaves the directory to this one.
    pub fn spawn_sibling(&self, flags: &[&str], env: &[(&str, &str)], log_name: &str) -> Self {
        self.spawn_sibling_limited(flags, env, log_name, None)
    }

    /// [`PoolProcess::spawn_sibling`] with its open-files limit (soft and hard) set to `nofile`.
    pub fn spawn_sibling_limited(
        &self,
        flags: &[&str],
        env: &[(&str, &str)],
        log_name: &str,
        nofile: Option<u64>,
    ) -> Self {
        use std::os::unix::process::CommandExt;
        let log = self.dir.join(log_name);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ckpool-rs"));
        cmd.arg("-c")
            .arg(&self.cfg_path)
            .arg("-s")
            .arg(&self.sockdir)
            .arg("-n")
            .arg(&self.name)
            .arg("-l")
            .arg("7");
        cmd.args(flags);
        cmd.env("RUST_LOG", "debug");
        cmd.envs(env.iter().copied());
        cmd.current_dir(&self.dir);
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(n) = nofile {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            let set = move || {
                // SAFETY: setrlimit(2) only reads `lim`, a valid rlimit owned by the closure.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            // SAFETY: the hook runs in the forked child before exec; it only calls
            // setrlimit(2), which is async-signal-safe, and allocates nothing.
            unsafe {
                cmd.pre_exec(set);
            }
        }
        Self {
            child: cmd.spawn().unwrap(),
            dir: self.dir.clone(),
            addr: self.addr,
            sockdir: self.sockdir.clone(),
            log,
            name: self.name.clone(),
            cfg_path: self.cfg_path.clone(),
            borrowed_dir: true,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid in the instance's pid file, if it holds one.
    pub fn pidfile_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.sockdir.join("main.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Sends an admin command; `None` if the socket is not there (yet).
    pub fn admin(&self, cmd: &str) -> Option<String> {
        let mut s = UnixStream::connect(self.sockdir.join("listener")).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        common::admin::write_message(&mut s, cmd.as_bytes()).ok()?;
        let reply = common::admin::read_message(&mut s).ok()??;
        Some(String::from_utf8_lossy(&reply).into_owned())
    }

    /// The pool's statistics.
    pub fn stats(&self) -> Value {
        serde_json::from_str(&self.admin("stats").expect("stats")).unwrap()
    }

    /// The pool's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends the process a signal (`libc::SIGTERM`, `libc::SIGINT`...).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) takes plain integers; `pid` is our own child, not yet reaped (the
        // `Child` is alive and `wait` has not returned a status for it).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Waits up to `deadline` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Asks the pool to shut down and waits for it.
    pub fn shutdown(&mut self) {
        // The admin socket may be another instance's by now (a handover).
        if !self.is_running() {
            return;
        }
        let _ = self.admin("shutdown");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PoolProcess {
    fn drop(&mut self) {
        self.shutdown();
        if std::thread::panicking() {
            eprintln!(
                "--- pool log ({}) ---\n{}",
                self.log.display(),
                tail(&self.log_text(), 200)
            );
        } else if !self.borrowed_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A raw stratum client speaking lines.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
    pub seen: Vec<Value>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self::from_stream(stream)
    }

    /// A client on a connected stream (with a read timeout set).
    pub fn from_stream(stream: TcpStream) -> Self {
        let reader = BufReader::new(stream.try_clone().unwrap());
        Self {
            stream,
            reader,
            seen: Vec::new(),
        }
    }

    pub fn send(&mut self, v: &Value) {
        self.send_raw(format!("{v}\n").as_bytes());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one line, or `None` on timeout; `Err(())` when the server closed the connection.
    pub fn read_line(&mut self) -> Result<Option<Value>, ()> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(()),
            Ok(_) => {
                let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::String(line));
                self.seen.push(v.clone());
                Ok(Some(v))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(_) => Err(()),
        }
    }

    /// Waits for a message matching `pred`.
    pub fn wait_for(
        &mut self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            match self.read_line() {
                Ok(Some(v)) if pred(&v) => return v,
                Ok(_) => {}
                Err(()) => panic!(
                    "connection closed while waiting for {what}; seen {:?}",
                    self.seen
                ),
            }
        }
        panic!("timed out waiting for {what}; seen {:?}", self.seen);
    }

    /// Waits for the reply with this id.
    pub fn reply(&mut self, id: u64) -> Value {
        self.wait_for(&format!("reply {id}"), WAIT, |v| v["id"] == id)
    }

    /// Waits until the server closes the connection.
    pub fn wait_closed(&mut self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if self.read_line().is_err() {
                return true;
            }
        }
        false
    }

    /// Subscribes and authorises; returns (extranonce1, nonce2 length).
    pub fn login(&mut self, user: &str) -> (String, usize) {
        self.send(&json!({"id": 1, "method": "mining.subscribe", "params": ["raw-test/1"]}));
        let r = self.reply(1);
        let en1 = r["result"][1].as_str().unwrap().to_owned();
        let n2 = r["result"][2].as_u64().unwrap() as usize;
        self.send(&json!({"id": 2, "method": "mining.authorize", "params": [user, "x"]}));
        assert_eq!(self.reply(2)["result"], true);
        (en1, n2)
    }
}

/// Polls the pool's stats until `pred` holds.
pub fn wait_stats(
    pool: &PoolProcess,
    what: &str,
    deadline: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if let Some(s) = pool
            .admin("stats")
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        {
            if pred(&s) {
                return s;
            }
            last = s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}; last stats {last}");
}

/// Unused helper kept for symmetry with node.rs waits.
pub fn wait(what: &str, cond: impl FnMut() -> bool) {
    wait_until(what, WAIT, cond);
}

/// Path helper.
pub fn p(path: &Path) -> String {
    path.display().to_string()
}

/// The share log's lines: (accepted, rejected), over every `<height>/<job>.sharelog` under
/// `logdir`; every line must be whole JSON.
pub fn share_log_lines(logdir: &Path) -> (u64, u64) {
    let (mut accepted, mut rejected) = (0, 0);
    for dir in std::fs::read_dir(logdir)
        .unwrap()
        .map(|d| d.unwrap().path())
    {
        let is_height = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.len() == 8 && u64::from_str_radix(n, 16).is_ok());
        if !is_height || !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap().map(|f| f.unwrap().path()) {
            assert_eq!(file.extension().and_then(|e| e.to_str()), Some("sharelog"));
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: {e}: {line}", file.display()));
                match v["result"].as_bool() {
                    Some(true) => accepted += 1,
                    Some(false) => rejected += 1,
                    None => panic!("no result in {line}"),
                }
            }
        }
    }
    (accepted, rejected)
}
