//! ckpool.conf-compatible configuration: the raw file schema and its validated form.
//!
//! Differences from ckpool, on purpose: a file that does not parse is an error (ckpool carries on
//! with defaults); integers are accepted where ckpool demanded reals and reals where it demanded
//! integers for difficulties (fractional `mindiff`/`startdiff`/`maxdiff` are allowed); unknown keys
//! produce a warning naming them. As in ckpool, text after the JSON object is ignored, so it can
//! hold comments.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::target::Difficulty;

/// One bitcoind RPC server.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Btcd {
    /// `host:port` or `http://host:port`.
    pub url: String,
    /// RPC user name.
    #[serde(default)]
    pub auth: String,
    /// RPC password.
    #[serde(default)]
    pub pass: String,
    /// Cookie file to read credentials from instead of auth/pass.
    #[serde(default)]
    pub cookie: Option<PathBuf>,
    /// This node runs the notifier for us, so its best block is not polled.
    #[serde(default)]
    pub notify: bool,
}

/// One upstream pool of the `proxy` array (proxy and passthrough modes).
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct Proxy {
    /// `host:port`, optionally `stratum+tcp://host:port`.
    pub url: String,
    /// Worker name to authorise as (unused by a passthrough).
    #[serde(default)]
    pub auth: String,
    /// Its password (unused by a passthrough).
    #[serde(default)]
    pub pass: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("url", &self.url)
            .field("auth", &self.auth)
            .field("pass", &"<redacted>")
            .finish()
    }
}

/// Difficulty rules for one listen address (`listendiff`).
#[derive(Debug, Clone, PartialEq)]
pub struct ListenDiff {
    /// The listen address (`host:port`); added to the listeners if `serverurl` lacks it.
    pub url: String,
    /// Starting difficulty of clients on it.
    pub startdiff: Option<Difficulty>,
    /// Minimum difficulty of clients on it.
    pub mindiff: Option<Difficulty>,
}

/// A minimum difficulty by user agent (`useragentdiff`).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentDiff {
    /// Case-insensitive substring of the user agent.
    pub pattern: String,
    /// Minimum (and starting) difficulty for matching clients.
    pub mindiff: Difficulty,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// bitcoind servers in priority order.
    pub btcd: Vec<Btcd>,
    /// Whether `nonce2length` was given (the proxy modes split the upstream's extranonce2
    /// themselves when it was not).
    pub nonce2length_given: bool,
    /// Address paid in pool mode (optional in solo mode).
    pub btcaddress: Option<String>,
    /// Coinbase signature.
    pub btcsig: String,
    /// `getbestblockhash` polling period.
    pub blockpoll: Duration,
    /// Percentage of the reward sent to `donaddress`, 0 when unset.
    pub donation: f64,
    /// Address receiving the donation.
    pub donaddress: Option<String>,
    /// extranonce1 bytes per client (2-8).
    pub nonce1length: usize,
    /// extranonce2 bytes given to miners (2-8).
    pub nonce2length: usize,
    /// Routine template refresh period.
    pub update_interval: Duration,
    /// Header version bits miners may roll.
    pub version_mask: u32,
    /// Stratum listen addresses (`host:port`).
    pub serverurl: Vec<String>,
    /// Listen addresses on which a client may become a passthrough (`mining.passthrough`);
    /// each is listened on too (it may also be in `serverurl`). Empty: no passthroughs.
    pub passthroughserver: Vec<String>,
    /// Listen addresses on which a client may become a node (`mining.node`); each is listened
    /// on too. Empty: no nodes.
    pub nodeserver: Vec<String>,
    /// Upstream pools of the proxy and passthrough modes, best first (`proxy`).
    pub proxy: Vec<Proxy>,
    /// Redirector mode: where miners are sent (`client.reconnect`) once they have had a share
    /// accepted upstream, as `host:port` (`redirecturl`).
    pub redirecturl: Vec<String>,
    /// Vardiff floor and floor for suggested difficulties.
    pub mindiff: Difficulty,
    /// Starting difficulty.
    pub startdiff: Difficulty,
    /// Starting difficulty and floor on "highdiff" listen ports (port above 4000).
    pub highdiff: Difficulty,
    /// Vardiff ceiling.
    pub maxdiff: Option<Difficulty>,
    /// Whether `highdiff` was set in the file: only then are listen ports above 4000
    /// high-difficulty ports (ckpool applies that rule always; here it is opt-in).
    pub highdiff_ports: bool,
    /// Log, stats and share-log root.
    pub logdir: PathBuf,
    /// Connection limit.
    pub maxclients: Option<usize>,
    /// Connection limit per client IP address (`maxclientsperip`); `None`: no limit.
    pub maxclientsperip: Option<usize>,
    /// Cap in bytes on what all connections together have queued and not yet sent (the key
    /// `maxoutbound` is in MiB; 1024 by default); over it, the connections with the most unsent
    /// bytes (peers that do not read) are closed.
    pub maxoutbound: usize,
    /// Connections that send no complete line for this long are closed (`idletimeout`, in
    /// seconds; 3600 by default, 0 turns it off: `None`).
    pub idletimeout: Option<Duration>,
    /// Back-pressure: a connection with more than this many bytes queued and not yet sent is not
    /// read until they drain to half of it (`pausereads`, in KiB; 16 by default, 0 turns it off:
    /// `None`).
    pub pausereads: Option<usize>,
    /// A connection paused by `pausereads` to which nothing could be sent for this long is
    /// closed (`stalltimeout`, in seconds; 30 by default, 0 turns it off: `None`).
    pub stalltimeout: Option<Duration>,
    /// bitcoind ZMQ hashblock endpoint.
    pub zmqblock: Option<String>,
    /// Longest accepted stratum line in bytes (ckpool: 1024; here 16 KiB by default).
    pub maxlinelength: usize,
    /// Connector threads; `None` = one per core.
    pub threads: Option<usize>,
    /// I/O backend: `auto`, `epoll` or `uring`.
    pub io: String,
    /// How connector threads hand events to the stratifier: `inline` (the stratifier runs on the
    /// connector thread) or `queue` (batches through a queue to a stratifier thread per
    /// connector thread, on the same CPU).
    pub handoff: String,
    /// Clients that have not authorised this long after connecting are dropped (ckpool: 60 s).
    pub authtimeout: Duration,
    /// Per-listen-address start/minimum difficulties.
    pub listendiff: Vec<ListenDiff>,
    /// Minimum difficulties by user agent, first match wins.
    pub useragentdiff: Vec<AgentDiff>,
    /// Send whole difficulties as powers of two.
    pub diffpow2: bool,
    /// Pin connector thread t (and its stratifier thread) to the t-th CPU the process may use.
    /// Turn off when several processes share the CPUs without `taskset` masks of their own.
    pub pin: bool,
    /// Passthrough, node and redirector modes: ask the upstream for multicast lines (one line
    /// for a job's notify to many miners instead of one per miner; a ckpool-rs pool honours it,
    /// ckpool ignores it). Default true.
    pub multicast: bool,
    /// How often `<logdir>/pool/pool.status` and `<logdir>/users/*` are rewritten (ckpool's
    /// `statsupdate`, 60 s by default).
    pub statsupdate: Duration,
    /// The most disconnected sessions kept for resume at once; the oldest are forgotten first
    /// (ckpool keeps any number). 0 turns resume off.
    pub maxparked: usize,
    /// A client is dropped after this many invalid shares in a row (stale shares do not count;
    /// an accepted share ends the run); from half as many on, only one of its shares in 8 is
    /// checked, the others are rejected unchecked. 0: never.
    pub maxinvalidshares: u32,
    /// A user or worker with no connection and no accepted share for this long is forgotten from
    /// memory (its figures stay in the stats files).
    pub statsidle: Duration,
    /// Distinct users the clients of one address may add to the statistics (their shares count
    /// in the pool totals either way). 0: no limit.
    pub maxusersperip: usize,
    /// Address (`host:port`) of the read-only HTTP listener (`/metrics`, `/api/...`, the
    /// dashboard at `/`); `None` (the default): no HTTP listener.
    pub webserver: Option<String>,
    /// Proxy modes: the most upstream connections open at once (the `proxy` entry's, recruited
    /// ones and, in userproxy mode, one per user). Default 100.
    pub maxupstreams: usize,
    /// Proxy modes: hosts a `client.reconnect` from the upstream may send us to besides the
    /// `proxy` entries' own (compared without case).
    pub reconnectallow: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            btcd: vec![Btcd {
                url: "localhost:8332".into(),
                auth: "user".into(),
                pass: "pass".into(),
                cookie: None,
                notify: false,
            }],
            proxy: Vec::new(),
            nonce2length_given: false,
            btcaddress: None,
            btcsig: String::new(),
            blockpoll: Duration::from_millis(100),
            donation: 0.0,
            donaddress: None,
            nonce1length: 4,
            nonce2length: 8,
            update_interval: Duration::from_secs(30),
            version_mask: 0x1fff_e000,
            serverurl: vec!["0.0.0.0:3333".into()],
            passthroughserver: Vec::new(),
            redirecturl: Vec::new(),
            nodeserver: Vec::new(),
            mindiff: Difficulty::ONE,
            startdiff: diff_const(42),
            highdiff: diff_const(1_000_000),
            maxdiff: None,
            highdiff_ports: false,
            logdir: PathBuf::from("logs"),
            maxclients: None,
            maxclientsperip: None,
            maxoutbound: 1024 << 20,
            idletimeout: Some(Duration::from_secs(3600)),
            pausereads: Some(16 << 10),
            stalltimeout: Some(Duration::from_secs(30)),
            zmqblock: Some("tcp://127.0.0.1:28332".into()),
            maxlinelength: 16 * 1024,
            threads: None,
            io: "auto".into(),
            handoff: "inline".into(),
            authtimeout: Duration::from_secs(60),
            listendiff: Vec::new(),
            useragentdiff: Vec::new(),
            diffpow2: false,
            pin: true,
            multicast: true,
            statsupdate: Duration::from_secs(60),
            maxparked: 100_000,
            maxinvalidshares: 100,
            statsidle: Duration::from_secs(3 * 86_400),
            maxusersperip: 256,
            webserver: None,
            maxupstreams: 100,
            reconnectallow: Vec::new(),
        }
    }
}

const fn diff_const(whole: u64) -> Difficulty {
    Difficulty::from_units((whole as u128) << 32)
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not a JSON object.
    #[error("config is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The top level is not an object.
    #[error("config must be a JSON object")]
    NotObject,
    /// A key has the wrong type.
    #[error("config key {key}: {source}")]
    Type {
        /// The key.
        key: &'static str,
        /// What was wrong.
        #[source]
        source: serde_json::Error,
    },
    /// A value is out of range or malformed.
    #[error("config key {key}: {why}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What was wrong.
        why: String,
    },
}

/// Every key this loader knows.
const KNOWN_KEYS: &[&str] = &[
    "btcd",
    "proxy",
    "btcaddress",
    "btcsig",
    "blockpoll",
    "donation",
    "donaddress",
    "nonce1length",
    "nonce2length",
    "update_interval",
    "version_mask",
    "serverurl",
    "passthroughserver",
    "nodeserver",
    "trusted",
    "upstream",
    "mindiff",
    "startdiff",
    "highdiff",
    "maxdiff",
    "logdir",
    "maxclients",
    "maxclientsperip",
    "maxoutbound",
    "idletimeout",
    "pausereads",
    "stalltimeout",
    "zmqblock",
    "redirecturl",
    "maxlinelength",
    "threads",
    "io",
    "handoff",
    "authtimeout",
    "listendiff",
    "useragentdiff",
    "diffpow2",
    "pin",
    "multicast",
    "statsupdate",
    "maxparked",
    "maxinvalidshares",
    "statsidle",
    "maxusersperip",
    "webserver",
    "maxupstreams",
    "reconnectallow",
];

/// A loaded configuration plus the warnings to log.
#[derive(Debug)]
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// Human-readable warnings (unknown keys, clamped values).
    pub warnings: Vec<String>,
}

/// Parses ckpool.conf text. Text after the first JSON value is ignored.
pub fn parse(text: &str) -> Result<Loaded, ConfigError> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = match stream.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(ConfigError::Json(e)),
        None => return Err(ConfigError::NotObject),
    };
    let Value::Object(map) = value else {
        return Err(ConfigError::NotObject);
    };
    let mut warnings = Vec::new();
    for key in map.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            warnings.push(format!("unknown config key \"{key}\" ignored"));
        }
    }
    let mut c = Config::default();
    if let Some(v) = map.get("btcd") {
        c.btcd = typed::<Vec<Btcd>>("btcd", v)?;
        if c.btcd.is_empty() {
            return Err(invalid("btcd", "must list at least one server"));
        }
    }
    if let Some(v) = map.get("btcaddress") {
        c.btcaddress = Some(typed::<String>("btcaddress", v)?);
    }
    if let Some(v) = map.get("btcsig") {
        c.btcsig = typed::<String>("btcsig", v)?;
    }
    if let Some(v) = map.get("blockpoll") {
        c.blockpoll = Duration::from_millis(whole("blockpoll", v, 1, 3_600_000)?);
    }
    if let Some(v) = map.get("donation") {
        let d = typed::<f64>("donation", v)?;
        if !(0.0..=100.0).contains(&d) {
            return Err(invalid("donation", "must be a percentage from 0 to 100"));
        }
        c.donation = if d < 0.1 { 0.0 } else { d.min(99.9) };
    }
    if let Some(v) = map.get("donaddress") {
        c.donaddress = Some(typed::<String>("donaddress", v)?);
    }
    if let Some(v) = map.get("nonce1length") {
        c.nonce1length = usize::try_from(whole("nonce1length", v, 2, 8)?).unwrap_or(4);
    }
    if let Some(v) = map.get("proxy") {
        c.proxy = typed::<Vec<Proxy>>("proxy", v)?;
    }
    if let Some(v) = map.get("nonce2length") {
        c.nonce2length_given = true;
        // At least 4 (NiceHash and others need the room), at most 8 (WhatsMiner fails above).
        c.nonce2length = usize::try_from(whole("nonce2length", v, 4, 8)?).unwrap_or(8);
    }
    if let Some(v) = map.get("update_interval") {
        c.update_interval = Duration::from_secs(whole("update_interval", v, 1, 86_400)?);
    }
    if let Some(v) = map.get("version_mask") {
        let s = typed::<String>("version_mask", v)?;
        c.version_mask = u32::from_str_radix(s.trim_start_matches("0x"), 16)
            .map_err(|_| invalid("version_mask", "must be a hex string such as \"1fffe000\""))?;
    }
    if let Some(v) = map.get("serverurl") {
        c.serverurl = match v {
            Value::String(s) => vec![s.clone()],
            other => typed::<Vec<String>>("serverurl", other)?,
        };
        if c.serverurl.is_empty() {
            return Err(invalid("serverurl", "must list at least one address"));
        }
    }
    if let Some(v) = map.get("passthroughserver") {
        c.passthroughserver = match v {
            Value::String(s) => vec![s.clone()],
            other => typed::<Vec<String>>("passthroughserver", other)?,
        };
    }
    if let Some(v) = map.get("redirecturl") {
        c.redirecturl = match v {
            Value::String(s) => vec![s.clone()],
            other => typed::<Vec<String>>("redirecturl", other)?,
        };
    }
    if let Some(v) = map.get("nodeserver") {
        c.nodeserver = match v {
            Value::String(s) => vec![s.clone()],
            other => typed::<Vec<String>>("nodeserver", other)?,
        };
    }
    if let Some(v) = map.get("mindiff") {
        c.mindiff = difficulty("mindiff", v)?;
    }
    if let Some(v) = map.get("startdiff") {
        c.startdiff = difficulty("startdiff", v)?;
    }
    if let Some(v) = map.get("highdiff") {
        c.highdiff = difficulty("highdiff", v)?;
        c.highdiff_ports = true;
    }
    if let Some(v) = map.get("maxdiff") {
        // ckpool treats 0 as "no cap".
        if typed::<f64>("maxdiff", v)? != 0.0 {
            c.maxdiff = Some(difficulty("maxdiff", v)?);
        }
    }
    if let Some(v) = map.get("logdir") {
        c.logdir = PathBuf::from(typed::<String>("logdir", v)?);
    }
    if let Some(v) = map.get("maxclients") {
        c.maxclients =
            Some(usize::try_from(whole("maxclients", v, 1, u64::MAX)?).unwrap_or(usize::MAX));
    }
    if let Some(v) = map.get("maxclientsperip") {
        c.maxclientsperip =
            Some(usize::try_from(whole("maxclientsperip", v, 1, u64::MAX)?).unwrap_or(usize::MAX));
    }
    if let Some(v) = map.get("maxoutbound") {
        let mib = whole("maxoutbound", v, 1, 1 << 20)?;
        c.maxoutbound = usize::try_from(mib << 20).unwrap_or(usize::MAX);
    }
    if let Some(v) = map.get("idletimeout") {
        let secs = whole("idletimeout", v, 0, 7 * 86_400)?;
        c.idletimeout = (secs > 0).then(|| Duration::from_secs(secs));
    }
    if let Some(v) = map.get("pausereads") {
        let kib = whole("pausereads", v, 0, 1 << 20)?;
        c.pausereads = (kib > 0).then(|| usize::try_from(kib << 10).unwrap_or(usize::MAX));
    }
    if let Some(v) = map.get("stalltimeout") {
        let secs = whole("stalltimeout", v, 0, 7 * 86_400)?;
        c.stalltimeout = (secs > 0).then(|| Duration::from_secs(secs));
    }
    if let Some(v) = map.get("zmqblock") {
        c.zmqblock = match v {
            Value::Null => None,
            other => Some(typed::<String>("zmqblock", other)?),
        };
    }
    if let Some(v) = map.get("maxlinelength") {
        c.maxlinelength =
            usize::try_from(whole("maxlinelength", v, 256, 1 << 24)?).unwrap_or(16 * 1024);
    }
    if let Some(v) = map.get("threads") {
        c.threads = Some(usize::try_from(whole("threads", v, 1, 1024)?).unwrap_or(1));
    }
    if let Some(v) = map.get("io") {
        let s = typed::<String>("io", v)?;
        if !matches!(s.as_str(), "auto" | "epoll" | "uring") {
            return Err(invalid("io", "must be \"auto\", \"epoll\" or \"uring\""));
        }
        c.io = s;
    }
    if let Some(v) = map.get("handoff") {
        let s = typed::<String>("handoff", v)?;
        if !matches!(s.as_str(), "inline" | "queue") {
            return Err(invalid("handoff", "must be \"inline\" or \"queue\""));
        }
        c.handoff = s;
    }
    if let Some(v) = map.get("authtimeout") {
        c.authtimeout = Duration::from_secs(whole("authtimeout", v, 1, 86_400)?);
    }
    if let Some(v) = map.get("listendiff") {
        let Value::Array(items) = v else {
            return Err(invalid(
                "listendiff",
                "must be an array of {\"url\", \"startdiff\", \"mindiff\"}",
            ));
        };
        for item in items {
            let url = item
                .get("url")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("listendiff", "each entry needs a \"url\" string"))?;
            let startdiff = item
                .get("startdiff")
                .map(|d| difficulty("listendiff", d))
                .transpose()?;
            let mindiff = item
                .get("mindiff")
                .map(|d| difficulty("listendiff", d))
                .transpose()?;
            c.listendiff.push(ListenDiff {
                url: url.to_owned(),
                startdiff,
                mindiff,
            });
        }
    }
    if let Some(v) = map.get("useragentdiff") {
        let Value::Array(items) = v else {
            return Err(invalid(
                "useragentdiff",
                "must be an array of {\"match\", \"mindiff\"}",
            ));
        };
        for item in items {
            let pattern = item
                .get("match")
                .and_then(Value::as_str)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "useragentdiff",
                        "each entry needs a non-empty \"match\" string",
                    )
                })?;
            let mindiff = item
                .get("mindiff")
                .ok_or_else(|| invalid("useragentdiff", "each entry needs \"mindiff\""))
                .and_then(|d| difficulty("useragentdiff", d))?;
            c.useragentdiff.push(AgentDiff {
                pattern: pattern.to_ascii_lowercase(),
                mindiff,
            });
        }
    }
    if let Some(v) = map.get("diffpow2") {
        c.diffpow2 = typed::<bool>("diffpow2", v)?;
    }
    if let Some(v) = map.get("pin") {
        c.pin = typed::<bool>("pin", v)?;
    }
    if let Some(v) = map.get("multicast") {
        c.multicast = typed::<bool>("multicast", v)?;
    }
    if let Some(v) = map.get("statsupdate") {
        c.statsupdate = Duration::from_secs(whole("statsupdate", v, 1, 3600)?);
    }
    if let Some(v) = map.get("maxparked") {
        c.maxparked = usize::try_from(whole("maxparked", v, 0, 10_000_000)?).unwrap_or(usize::MAX);
    }
    if let Some(v) = map.get("maxinvalidshares") {
        c.maxinvalidshares =
            u32::try_from(whole("maxinvalidshares", v, 0, 1_000_000)?).unwrap_or(u32::MAX);
    }
    if let Some(v) = map.get("statsidle") {
        c.statsidle = Duration::from_secs(whole("statsidle", v, 60, 365 * 86_400)?);
    }
    if let Some(v) = map.get("maxusersperip") {
        c.maxusersperip =
            usize::try_from(whole("maxusersperip", v, 0, 100_000_000)?).unwrap_or(usize::MAX);
    }
    if let Some(v) = map.get("maxupstreams") {
        c.maxupstreams = usize::try_from(whole("maxupstreams", v, 1, 10_000)?).unwrap_or(10_000);
    }
    if let Some(v) = map.get("reconnectallow") {
        c.reconnectallow = typed::<Vec<String>>("reconnectallow", v)?;
    }
    if let Some(v) = map.get("webserver") {
        let addr = typed::<String>("webserver", v)?;
        if addr.trim().is_empty() {
            return Err(invalid("webserver", "must be an address (host:port)"));
        }
        c.webserver = Some(addr);
    }
    if c.startdiff < c.mindiff {
        warnings.push(format!(
            "startdiff {} is below mindiff {}; using mindiff",
            c.startdiff, c.mindiff
        ));
        c.startdiff = c.mindiff;
    }
    if let Some(max) = c.maxdiff
        && max < c.mindiff
    {
        return Err(invalid("maxdiff", "must not be below mindiff"));
    }
    Ok(Loaded {
        config: c,
        warnings,
    })
}

fn typed<T: serde::de::DeserializeOwned>(key: &'static str, v: &Value) -> Result<T, ConfigError> {
    T::deserialize(v).map_err(|source| ConfigError::Type { key, source })
}

fn invalid(key: &'static str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        why: why.into(),
    }
}

/// A whole number in `[min, max]`; a real with no fractional part is accepted too.
fn whole(key: &'static str, v: &Value, min: u64, max: u64) -> Result<u64, ConfigError> {
    let n = match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                .map(|f| f as u64)
        }),
        _ => None,
    };
    let n = n.ok_or_else(|| invalid(key, "must be a non-negative whole number"))?;
    if n < min || n > max {
        return Err(invalid(key, &format!("{n} is outside {min}..={max}")));
    }
    Ok(n)
}

/// A difficulty: integer or real, above zero.
fn difficulty(key: &'static str, v: &Value) -> Result<Difficulty, ConfigError> {
    let f = typed::<f64>(key, v)?;
    Difficulty::from_f64(f).ok_or_else(|| invalid(key, "must be a number above 0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shipped_example() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ckpool.conf.example"
        ))
        .unwrap();
        let l = parse(&text).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert!(!l.config.btcd.is_empty());
    }

    #[test]
    fn ckpool_style_file_with_trailing_comments() {
        let l = parse(
            r#"{
            "btcd": [{"url": "127.0.0.1:8332", "auth": "user", "pass": "p", "notify": true}],
            "btcaddress": "14BMjogz69qe8hk9thyzbmR5pg34mVKB1e",
            "btcsig": "/mined by ck/",
            "blockpoll": 100,
            "donation": 2,
            "update_interval": 30,
            "serverurl": ["0.0.0.0:3333", "0.0.0.0:4334"],
            "mindiff": 1, "startdiff": 42.0, "maxdiff": 0,
            "logdir": "logs",
            "typo_key": 1
        }
        Comments after the object are ignored, as ckpool does.
        "#,
        )
        .unwrap();
        let c = l.config;
        assert_eq!(c.donation, 2.0);
        assert_eq!(c.startdiff, diff_const(42));
        assert_eq!(c.maxdiff, None);
        assert_eq!(c.serverurl.len(), 2);
        assert!(c.btcd[0].notify);
        assert_eq!(l.warnings.len(), 1);
        assert!(l.warnings[0].contains("typo_key"));
    }

    #[test]
    fn fractional_difficulties() {
        let c = parse(r#"{"mindiff": 0.001, "startdiff": 0.5, "maxdiff": 1e6}"#)
            .unwrap()
            .config;
        assert!(c.mindiff < Difficulty::ONE);
        assert_eq!(c.startdiff.to_f64(), 0.5);
        assert_eq!(c.maxdiff.map(Difficulty::to_f64), Some(1e6));
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(matches!(parse("{\"btcd\": "), Err(ConfigError::Json(_))));
        assert!(matches!(parse("[1]"), Err(ConfigError::NotObject)));
        assert!(matches!(parse(""), Err(ConfigError::NotObject)));
        assert!(matches!(
            parse(r#"{"btcaddress": 5}"#),
            Err(ConfigError::Type {
                key: "btcaddress",
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"nonce1length": 9}"#),
            Err(ConfigError::Invalid {
                key: "nonce1length",
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"mindiff": -1}"#),
            Err(ConfigError::Invalid { key: "mindiff", .. })
        ));
        assert!(matches!(
            parse(r#"{"version_mask": "zz"}"#),
            Err(ConfigError::Invalid { .. })
        ));
    }

    #[test]
    fn difficulty_rules() {
        let c = parse(
            r#"{"listendiff": [{"url": "0.0.0.0:4334", "startdiff": 65536, "mindiff": 1024}],
                "useragentdiff": [{"match": "NiceHash", "mindiff": 500000}],
                "diffpow2": true}"#,
        )
        .unwrap()
        .config;
        assert_eq!(c.listendiff[0].url, "0.0.0.0:4334");
        assert_eq!(c.listendiff[0].mindiff, Some(diff_const(1024)));
        assert_eq!(c.useragentdiff[0].pattern, "nicehash");
        assert!(c.diffpow2);
        assert!(c.pin);
        assert!(!parse(r#"{"pin": false}"#).unwrap().config.pin);
        assert!(!parse(r#"{"multicast": false}"#).unwrap().config.multicast);
        assert!(parse("{}").unwrap().config.multicast);
        assert!(parse(r#"{"useragentdiff": [{"match": "x"}]}"#).is_err());
        assert!(parse(r#"{"listendiff": {"url": "x"}}"#).is_err());
        assert!(matches!(
            parse(r#"{"nonce2length": 3}"#),
            Err(ConfigError::Invalid {
                key: "nonce2length",
                ..
            })
        ));
    }

    #[test]
    fn hardening_limits() {
        let d = parse("{}").unwrap().config;
        assert_eq!(
            (
                d.maxparked,
                d.maxinvalidshares,
                d.statsidle,
                d.maxusersperip
            ),
            (100_000, 100, Duration::from_secs(259_200), 256)
        );
        let l = parse(
            r#"{"maxparked": 0, "maxinvalidshares": 30, "statsidle": 3600, "maxusersperip": 0}"#,
        )
        .unwrap();
        assert_eq!(l.config.maxusersperip, 0);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(
            (
                l.config.maxparked,
                l.config.maxinvalidshares,
                l.config.statsidle
            ),
            (0, 30, Duration::from_secs(3600))
        );
        assert!(matches!(
            parse(r#"{"statsidle": 10}"#),
            Err(ConfigError::Invalid {
                key: "statsidle",
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"maxparked": -1}"#),
            Err(ConfigError::Invalid {
                key: "maxparked",
                ..
            })
        ));
    }

    #[test]
    fn handoff_inline_or_queue() {
        assert_eq!(parse("{}").unwrap().config.handoff, "inline");
        let l = parse(r#"{"handoff": "queue", "io": "epoll"}"#).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.config.handoff, "queue");
        assert!(matches!(
            parse(r#"{"handoff": "spin"}"#),
            Err(ConfigError::Invalid { key: "handoff", .. })
        ));
        assert!(matches!(
            parse(r#"{"handoff": 1}"#),
            Err(ConfigError::Type { key: "handoff", .. })
        ));
    }

    #[test]
    fn maxupstreams_and_reconnectallow() {
        let d = parse("{}").unwrap().config;
        assert_eq!((d.maxupstreams, d.reconnectallow.len()), (100, 0));
        let l = parse(r#"{"maxupstreams": 3, "reconnectallow": ["pool2.example.com"]}"#).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.config.maxupstreams, 3);
        assert_eq!(
            l.config.reconnectallow,
            vec!["pool2.example.com".to_owned()]
        );
        for bad in [
            r#"{"maxupstreams": 0}"#,
            r#"{"maxupstreams": 1.5}"#,
            r#"{"reconnectallow": "pool2"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn webserver_off_by_default() {
        assert_eq!(parse("{}").unwrap().config.webserver, None);
        let l = parse(r#"{"webserver": "127.0.0.1:8080"}"#).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.config.webserver.as_deref(), Some("127.0.0.1:8080"));
        assert!(matches!(
            parse(r#"{"webserver": ""}"#),
            Err(ConfigError::Invalid {
                key: "webserver",
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"webserver": 8080}"#),
            Err(ConfigError::Type {
                key: "webserver",
                ..
            })
        ));
    }

    #[test]
    fn statsupdate_seconds() {
        assert_eq!(
            parse("{}").unwrap().config.statsupdate,
            Duration::from_secs(60)
        );
        let l = parse(r#"{"statsupdate": 5}"#).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(l.config.statsupdate, Duration::from_secs(5));
        for bad in [
            r#"{"statsupdate": 0}"#,
            r#"{"statsupdate": 3601}"#,
            r#"{"statsupdate": -1}"#,
            r#"{"statsupdate": 1.5}"#,
            r#"{"statsupdate": "60"}"#,
        ] {
            assert!(
                matches!(
                    parse(bad),
                    Err(ConfigError::Invalid {
                        key: "statsupdate",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn connection_hardening_keys() {
        let d = parse("{}").unwrap().config;
        assert_eq!(
            (d.maxclientsperip, d.maxoutbound, d.idletimeout),
            (None, 1 << 30, Some(Duration::from_secs(3600)))
        );
        let l = parse(r#"{"maxclientsperip": 3, "maxoutbound": 64, "idletimeout": 30}"#).unwrap();
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        assert_eq!(
            (
                l.config.maxclientsperip,
                l.config.maxoutbound,
                l.config.idletimeout
            ),
            (Some(3), 64 << 20, Some(Duration::from_secs(30)))
        );
        // 0 turns the idle timeout off.
        assert_eq!(
            parse(r#"{"idletimeout": 0}"#).unwrap().config.idletimeout,
            None
        );
        assert_eq!(
            (d.pausereads, d.stalltimeout),
            (Some(16 << 10), Some(Duration::from_secs(30)))
        );
        let b = parse(r#"{"pausereads": 256, "stalltimeout": 5}"#).unwrap();
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        assert_eq!(
            (b.config.pausereads, b.config.stalltimeout),
            (Some(256 << 10), Some(Duration::from_secs(5)))
        );
        let off = parse(r#"{"pausereads": 0, "stalltimeout": 0}"#)
            .unwrap()
            .config;
        assert_eq!((off.pausereads, off.stalltimeout), (None, None));
        for (bad, key) in [
            (r#"{"maxclientsperip": 0}"#, "maxclientsperip"),
            (r#"{"maxoutbound": 0}"#, "maxoutbound"),
            (r#"{"maxoutbound": -1}"#, "maxoutbound"),
            (r#"{"idletimeout": 1.5}"#, "idletimeout"),
            (r#"{"idletimeout": 604801}"#, "idletimeout"),
            (r#"{"pausereads": -1}"#, "pausereads"),
            (r#"{"pausereads": 1048577}"#, "pausereads"),
            (r#"{"stalltimeout": 604801}"#, "stalltimeout"),
        ] {
            assert!(
                matches!(parse(bad), Err(ConfigError::Invalid { key: k, .. }) if k == key),
                "{bad}"
            );
        }
    }

    #[test]
    fn passthroughserver_and_proxy() {
        let c = parse(
            r#"{"passthroughserver": "127.0.0.1:3334",
                "proxy": [{"url": "pool.example:3333", "auth": "u", "pass": "p"}, {"url": "b:1"}]}"#,
        )
        .unwrap()
        .config;
        assert_eq!(c.passthroughserver, vec!["127.0.0.1:3334".to_string()]);
        assert_eq!(c.proxy.len(), 2);
        assert_eq!(c.proxy[0].auth, "u");
        assert_eq!(c.proxy[1].pass, "");
        assert!(!format!("{:?}", c.proxy[0]).contains("\"p\""));
        assert!(parse(r#"{"proxy": [{"auth": "u"}]}"#).is_err());
        assert!(parse(r#"{"passthroughserver": 5}"#).is_err());
        assert!(Config::default().passthroughserver.is_empty());
        let c = parse(r#"{"nodeserver": ["127.0.0.1:3335"]}"#)
            .unwrap()
            .config;
        assert_eq!(c.nodeserver, vec!["127.0.0.1:3335".to_string()]);
        assert!(parse(r#"{"nodeserver": {}}"#).is_err());
        assert!(Config::default().nodeserver.is_empty());
    }

    #[test]
    fn redirecturl_is_a_list_of_addresses() {
        let c = parse(r#"{"redirecturl": ["a.example:3333", "10.0.0.2:3334"]}"#)
            .unwrap()
            .config;
        assert_eq!(c.redirecturl, ["a.example:3333", "10.0.0.2:3334"]);
        let c = parse(r#"{"redirecturl": "a.example:3333"}"#)
            .unwrap()
            .config;
        assert_eq!(c.redirecturl, ["a.example:3333"]);
        assert!(matches!(
            parse(r#"{"redirecturl": [1]}"#),
            Err(ConfigError::Type {
                key: "redirecturl",
                ..
            })
        ));
        assert!(Config::default().redirecturl.is_empty());
    }

    #[test]
    fn serverurl_string_or_array() {
        let c = parse(r#"{"serverurl": "127.0.0.1:3333"}"#).unwrap().config;
        assert_eq!(c.serverurl, vec!["127.0.0.1:3333".to_string()]);
    }
}
