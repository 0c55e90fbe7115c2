//! Redirector mode (`-R`, or the binary named `ckredirector`): a passthrough
//! ([`super::passthrough`]) that sends a miner `client.reconnect` to one of the `redirecturl`
//! addresses once the upstream has accepted one of its shares, and never before (ckpool.md
//! §5.4). Miners that never contribute stay on the passthrough; the pool behind it sees only
//! those that have not proved themselves yet.
//!
//! * Each miner's `mining.submit` ids are remembered (at most [`MAX_SUBMITS`], for
//!   [`SUBMIT_WINDOW`]). An upstream reply with one of those ids, `"result":true` and no error
//!   is an accepted share: the miner gets, right after that reply,
//!   `{"id":null,"method":"client.reconnect","params":["<host>","<port>",0]}` (the port as a
//!   string, as ckpool sends it) and is not watched any more. It is not closed: a miner that
//!   ignores the request goes on mining through the passthrough.
//! * Which address: the one its IP address was sent to before (stickiness), else the next one
//!   round-robin (the IP is then remembered, [`MAX_IPS`] at most, the oldest forgotten first).
//!   A miner from an IP already redirected is redirected as soon as its `mining.authorize` is
//!   accepted, without waiting for a share (as ckpool).
//! * The watch is per connector thread (no lock on the line path); only the IP table is
//!   shared, and locked once per redirect or authorisation.
//! * Handover (`-H`, as a passthrough's): each miner's watch travels with it
//!   ([`Watcher::export`]), the IP table, the round-robin position and the counters with the
//!   link's state ([`Redirects::export_state`]).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ConnId;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::instance::Instance;
use crate::settings::{ConfigError, Settings};

/// How long a submit's id is looked for in the upstream's replies (ckpool: 120 s).
pub(crate) const SUBMIT_WINDOW: Duration = Duration::from_secs(120);
/// Submit ids remembered per miner, at most (the oldest forgotten first).
pub(crate) const MAX_SUBMITS: usize = 64;
/// Authorize ids remembered per miner, at most.
const MAX_AUTHS: usize = 4;
/// IP addresses remembered for stickiness, at most.
pub(crate) const MAX_IPS: usize = 65_536;

/// Runs redirector mode until `instance.shutdown` is set (or it handed itself over, `-H`):
/// passthrough mode with the redirect watch.
pub(crate) fn run(settings: &Settings, instance: &Instance) -> anyhow::Result<()> {
    let redirects = Arc::new(Redirects::new(&settings.file.redirecturl)?);
    info!(targets = ?redirects.urls(), "redirecting miners after their first accepted share");
    super::passthrough::run_link(
        settings,
        &instance.shutdown,
        None,
        Some(redirects),
        Some(instance),
    )
}

/// One `redirecturl` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    /// As configured.
    url: String,
    /// The host part, as written (sent to miners).
    host: String,
    /// The port, as a string (sent to miners).
    port: String,
}

impl Target {
    /// `host:port` (optionally `stratum+tcp://host:port`; IPv6 in brackets); the address must
    /// resolve.
    fn parse(url: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError(format!("redirecturl entry \"{url}\": {why}"));
        let rest = url.strip_prefix("stratum+tcp://").unwrap_or(url);
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("not host:port"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port_num: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("bad port"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let resolves = (bare, port_num)
            .to_socket_addrs()
            .map(|mut a| a.next().is_some())
            .unwrap_or(false);
        if !resolves {
            return Err(bad("does not resolve"));
        }
        Ok(Self {
            url: url.to_owned(),
            host: host.to_owned(),
            port: port.to_owned(),
        })
    }

    /// The line that sends a miner here.
    fn reconnect_line(&self) -> Vec<u8> {
        let mut l = format!(
            "{{\"id\":null,\"method\":\"client.reconnect\",\"params\":[{},{},0]}}",
            json!(self.host),
            json!(self.port)
        )
        .into_bytes();
        l.push(b'\n');
        l
    }
}

/// What every connector thread's [`Watcher`] shares: the targets, the IP table, the counters.
pub(crate) struct Redirects {
    targets: Vec<Target>,
    /// The next target for a new IP.
    next: AtomicUsize,
    sticky: Mutex<Sticky>,
    /// Miners sent to each target.
    sent: Vec<AtomicU64>,
    /// Of those, miners redirected at authorisation because their IP was redirected before.
    by_ip: AtomicU64,
}

/// IP → target, bounded, the oldest forgotten first.
#[derive(Default)]
struct Sticky {
    map: HashMap<IpAddr, usize>,
    order: VecDeque<IpAddr>,
}

impl Redirects {
    /// From the `redirecturl` list: at least one entry, each `host:port` that resolves (as
    /// ckpool, which quits otherwise).
    pub(crate) fn new(urls: &[String]) -> Result<Self, ConfigError> {
        if urls.is_empty() {
            return Err(ConfigError(
                "redirector mode needs at least one \"redirecturl\" entry".into(),
            ));
        }
        let targets = urls
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            sent: targets.iter().map(|_| AtomicU64::new(0)).collect(),
            targets,
            next: AtomicUsize::new(0),
            sticky: Mutex::new(Sticky::default()),
            by_ip: AtomicU64::new(0),
        })
    }

    fn urls(&self) -> Vec<&str> {
        self.targets.iter().map(|t| t.url.as_str()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sticky> {
        self.sticky
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The target `ip` was sent to before, if any.
    fn known(&self, ip: IpAddr) -> Option<usize> {
        self.lock().map.get(&ip).copied()
    }

    /// The target for `ip`: the one it had, else the next round-robin (remembered).
    fn assign(&self, ip: IpAddr) -> usize {
        let mut s = self.lock();
        if let Some(&t) = s.map.get(&ip) {
            return t;
        }
        let t = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len().max(1);
        if s.order.len() >= MAX_IPS
            && let Some(old) = s.order.pop_front()
        {
            s.map.remove(&old);
        }
        s.map.insert(ip, t);
        s.order.push_back(ip);
        t
    }

    /// Counts a redirect to `t` and gives its line.
    fn redirect(&self, t: usize) -> Option<(&str, Vec<u8>)> {
        let target = self.targets.get(t)?;
        if let Some(c) = self.sent.get(t) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        Some((&target.url, target.reconnect_line()))
    }

    /// The IP table, the round-robin position and the counters as they travel in a handover.
    pub(crate) fn export_state(&self) -> Value {
        let s = self.lock();
        let ips: Vec<Value> = s
            .order
            .iter()
            .filter_map(|ip| Some(json!([ip.to_string(), s.map.get(ip)?])))
            .collect();
        json!({
            "targets": self.urls(),
            "next": self.next.load(Ordering::Relaxed),
            "sent": self.sent.iter().map(|n| n.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            "by_ip": self.by_ip.load(Ordering::Relaxed),
            "ips": ips,
        })
    }

    /// Takes [`Redirects::export_state`] of the old instance (before any miner is served). With
    /// other `redirecturl` entries than the old instance's, its IP table and counters would name
    /// other addresses: they are left out (logged).
    pub(crate) fn import_state(&self, v: &Value) -> Result<(), String> {
        let targets: Vec<&str> = v
            .get("targets")
            .and_then(Value::as_array)
            .ok_or("no targets")?
            .iter()
            .map(|t| t.as_str().ok_or("bad target"))
            .collect::<Result<_, _>>()?;
        if targets != self.urls() {
            warn!(old = ?targets, new = ?self.urls(), "redirecturl changed: the old instance's IP table and counters are not taken over");
            return Ok(());
        }
        let n = |k: &str| v.get(k).and_then(Value::as_u64).ok_or(format!("bad {k}"));
        self.next.store(
            usize::try_from(n("next")?).map_err(|_| "bad next")?,
            Ordering::Relaxed,
        );
        self.by_ip.store(n("by_ip")?, Ordering::Relaxed);
        let sent = v.get("sent").and_then(Value::as_array).ok_or("bad sent")?;
        for (c, x) in self.sent.iter().zip(sent) {
            c.store(x.as_u64().ok_or("bad sent")?, Ordering::Relaxed);
        }
        let ips = v.get("ips").and_then(Value::as_array).ok_or("bad ips")?;
        let skip = ips.len().saturating_sub(MAX_IPS);
        let mut s = self.lock();
        for e in ips.iter().skip(skip) {
            let ip: IpAddr = e
                .get(0)
                .and_then(Value::as_str)
                .and_then(|i| i.parse().ok())
                .ok_or("bad ip")?;
            let t = e
                .get(1)
                .and_then(Value::as_u64)
                .and_then(|t| usize::try_from(t).ok())
                .filter(|&t| t < self.targets.len())
                .ok_or("bad target index")?;
            if s.map.insert(ip, t).is_none() {
                s.order.push_back(ip);
            }
        }
        Ok(())
    }

    /// For the admin `stats`: `{"targets":[{"url","redirected"}…],"by_ip","ips"}`.
    pub(crate) fn stats(&self) -> Value {
        let targets: Vec<Value> = self
            .targets
            .iter()
            .zip(&self.sent)
            .map(|(t, n)| json!({"url": t.url, "redirected": n.load(Ordering::Relaxed)}))
            .collect();
        json!({
            "targets": targets,
            "redirected": self.sent.iter().map(|n| n.load(Ordering::Relaxed)).sum::<u64>(),
            "by_ip": self.by_ip.load(Ordering::Relaxed),
            "ips": self.lock().map.len(),
        })
    }
}

/// One miner being watched (until it is redirected).
struct Watch {
    ip: IpAddr,
    /// Its `mining.authorize` ids not answered yet.
    auths: Vec<Value>,
    /// Its `mining.submit` ids not answered yet, with when they were sent.
    submits: VecDeque<(Value, Instant)>,
}

/// A connector thread's watch over its miners.
pub(crate) struct Watcher {
    shared: Arc<Redirects>,
    miners: HashMap<ConnId, Watch>,
}

impl Watcher {
    pub(crate) fn new(shared: Arc<Redirects>) -> Self {
        Self {
            shared,
            miners: HashMap::new(),
        }
    }

    /// A miner connected from `ip`.
    pub(crate) fn open(&mut self, conn: ConnId, ip: IpAddr) {
        self.miners.insert(
            conn,
            Watch {
                ip,
                auths: Vec::new(),
                submits: VecDeque::new(),
            },
        );
    }

    /// The miner left.
    pub(crate) fn close(&mut self, conn: ConnId) {
        self.miners.remove(&conn);
    }

    /// The miner's watch as it travels in a handover (`null`: it was redirected already, so it
    /// is not watched); it is not watched here any more.
    pub(crate) fn export(&mut self, conn: ConnId, now: Instant) -> Value {
        let Some(w) = self.miners.remove(&conn) else {
            return Value::Null;
        };
        let submits: Vec<Value> = w
            .submits
            .iter()
            .map(|(id, t)| {
                let age = u64::try_from(now.saturating_duration_since(*t).as_millis())
                    .unwrap_or(u64::MAX);
                json!([id, age])
            })
            .collect();
        json!({"ip": w.ip.to_string(), "auths": w.auths, "submits": submits})
    }

    /// Watches a miner handed over with the watch [`Watcher::export`] gave (`null`: not
    /// watched). False if `v` is not one.
    pub(crate) fn adopt(&mut self, conn: ConnId, v: &Value, now: Instant) -> bool {
        if v.is_null() {
            return true;
        }
        let Some(ip) = v
            .get("ip")
            .and_then(Value::as_str)
            .and_then(|i| i.parse::<IpAddr>().ok())
        else {
            return false;
        };
        let (Some(auths), Some(submits)) = (
            v.get("auths").and_then(Value::as_array),
            v.get("submits").and_then(Value::as_array),
        ) else {
            return false;
        };
        let submits = submits
            .iter()
            .take(MAX_SUBMITS)
            .filter_map(|s| {
                let age = Duration::from_millis(s.get(1)?.as_u64()?);
                Some((s.get(0)?.clone(), now.checked_sub(age)?))
            })
            .collect();
        self.miners.insert(
            conn,
            Watch {
                ip,
                auths: auths.iter().take(MAX_AUTHS).cloned().collect(),
                submits,
            },
        );
        true
    }

    /// A line the miner sent (on its way upstream): notes authorize and submit ids.
    pub(crate) fn up(&mut self, conn: ConnId, line: &[u8], now: Instant) {
        let Some(w) = self.miners.get_mut(&conn) else {
            return;
        };
        let submit = find(line, b"\"mining.submit\"");
        if !submit && !find(line, b"\"mining.authorize\"") {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return;
        };
        let Some(id) = v.get("id").filter(|id| !id.is_null()) else {
            return;
        };
        match v.get("method").and_then(Value::as_str) {
            Some("mining.submit") => {
                while w.submits.len() >= MAX_SUBMITS
                    || w.submits
                        .front()
                        .is_some_and(|(_, t)| now.duration_since(*t) >= SUBMIT_WINDOW)
                {
                    w.submits.pop_front();
                }
                w.submits.push_back((id.clone(), now));
            }
            Some("mining.authorize") => {
                if w.auths.len() >= MAX_AUTHS {
                    w.auths.remove(0);
                }
                w.auths.push(id.clone());
            }
            _ => {}
        }
    }

    /// A line from the upstream for the miner, forwarded to it: the `client.reconnect` line to
    /// send right after it, if this line is the miner's first accepted share (or its accepted
    /// authorisation, from an IP redirected before). The miner is not watched afterwards.
    pub(crate) fn down(&mut self, conn: ConnId, line: &[u8], now: Instant) -> Option<Vec<u8>> {
        let w = self.miners.get_mut(&conn)?;
        // Cheap filters first: notifies and difficulty changes are no replies.
        if (w.auths.is_empty() && w.submits.is_empty()) || !find(line, b"\"result\"") {
            return None;
        }
        let v = serde_json::from_slice::<Value>(line).ok()?;
        let id = v.get("id").filter(|id| !id.is_null())?;
        let ok = v.get("result") == Some(&Value::Bool(true))
            && v.get("error").is_none_or(Value::is_null);
        let ip = w.ip;
        let target = if let Some(i) = w.auths.iter().position(|a| a == id) {
            w.auths.remove(i);
            let t = ok.then(|| self.shared.known(ip)).flatten()?;
            self.shared.by_ip.fetch_add(1, Ordering::Relaxed);
            t
        } else {
            let i = w
                .submits
                .iter()
                .position(|(s, t)| s == id && now.duration_since(*t) < SUBMIT_WINDOW)?;
            w.submits.remove(i);
            if !ok {
                return None;
            }
            self.shared.assign(ip)
        };
        self.miners.remove(&conn);
        let (url, line) = self.shared.redirect(target)?;
        info!(%conn, %ip, url, "miner redirected");
        Some(line)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "test code")]

    use super::*;

    fn conn(n: u32) -> ConnId {
        ConnId::new(0, 1, n)
    }

    fn watcher(urls: &[&str]) -> Watcher {
        let urls: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
        Watcher::new(Arc::new(Redirects::new(&urls).unwrap()))
    }

    fn submit(id: u64) -> Vec<u8> {
        json!({"id": id, "method": "mining.submit",
            "params": ["u.w", "1", "00000000", "00000000", "00000000"]})
        .to_string()
        .into_bytes()
    }

    fn reply(id: u64, ok: bool) -> Vec<u8> {
        let err = if ok {
            Value::Null
        } else {
            json!([23, "Above target", null])
        };
        json!({"id": id, "result": ok, "error": err})
            .to_string()
            .into_bytes()
    }

    fn authorize(w: &mut Watcher, c: ConnId, now: Instant) -> Option<Vec<u8>> {
        w.up(
            c,
            br#"{"id":2,"method":"mining.authorize","params":["u.w","x"]}"#,
            now,
        );
        w.down(c, &reply(2, true), now)
    }

    #[test]
    fn reconnect_line_is_ckpools() {
        let t = Target::parse("localhost:3334").unwrap();
        assert_eq!(
            t.reconnect_line(),
            b"{\"id\":null,\"method\":\"client.reconnect\",\"params\":[\"localhost\",\"3334\",0]}\n"
        );
        let t = Target::parse("stratum+tcp://127.0.0.1:4000").unwrap();
        assert_eq!((t.host.as_str(), t.port.as_str()), ("127.0.0.1", "4000"));
        assert_eq!(Target::parse("[::1]:4000").unwrap().host, "[::1]");
        for bad in [
            "localhost",
            ":3333",
            "localhost:0",
            "localhost:x",
            "no.such.host.invalid:1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert!(Redirects::new(&[]).is_err());
    }

    #[test]
    fn only_an_accepted_share_redirects_and_only_once() {
        let mut w = watcher(&["127.0.0.1:4001", "127.0.0.1:4002"]);
        let now = Instant::now();
        let a = conn(1);
        w.open(a, "10.0.0.1".parse().unwrap());
        // The authorisation alone does nothing for a new IP, nor does a notify.
        assert_eq!(authorize(&mut w, a, now), None);
        let notify = br#"{"params":["1"],"id":null,"method":"mining.notify"}"#;
        assert_eq!(w.down(a, notify, now), None);
        // A rejected share, and an accepted reply to something else, do nothing.
        w.up(a, &submit(5), now);
        assert_eq!(w.down(a, &reply(5, false), now), None);
        w.up(a, &submit(6), now);
        assert_eq!(w.down(a, &reply(7, true), now), None);
        // The accepted share does, to the first target.
        let l = w.down(a, &reply(6, true), now).unwrap();
        assert!(find(&l, b"[\"127.0.0.1\",\"4001\",0]"), "{l:?}");
        // Once only.
        w.up(a, &submit(8), now);
        assert_eq!(w.down(a, &reply(8, true), now), None);
        let s = w.shared.stats();
        assert_eq!(s["redirected"], 1, "{s}");
        assert_eq!(s["targets"][0]["redirected"], 1, "{s}");
    }

    #[test]
    fn same_ip_sticks_at_authorisation_and_new_ips_round_robin() {
        let mut w = watcher(&["127.0.0.1:4001", "127.0.0.1:4002"]);
        let now = Instant::now();
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let (a, b, c, d) = (conn(1), conn(2), conn(3), conn(4));
        w.open(a, ip1);
        w.up(a, &submit(1), now);
        assert!(find(&w.down(a, &reply(1, true), now).unwrap(), b"4001"));
        // Same IP: redirected at once when authorised, to the same place.
        w.open(b, ip1);
        let l = authorize(&mut w, b, now).unwrap();
        assert!(find(&l, b"\"4001\""), "{l:?}");
        // A refused authorisation does not redirect.
        w.open(d, ip1);
        w.up(
            d,
            br#"{"id":2,"method":"mining.authorize","params":["u.w","x"]}"#,
            now,
        );
        assert_eq!(w.down(d, &reply(2, false), now), None);
        // Another IP: the next target, after its own share.
        w.open(c, ip2);
        assert_eq!(authorize(&mut w, c, now), None);
        w.up(c, &submit(9), now);
        assert!(find(&w.down(c, &reply(9, true), now).unwrap(), b"4002"));
        let s = w.shared.stats();
        assert_eq!(s["by_ip"], 1, "{s}");
        assert_eq!(s["ips"], 2, "{s}");
    }

    #[test]
    fn watches_and_the_ip_table_travel_in_a_handover() {
        let urls = ["127.0.0.1:4001", "127.0.0.1:4002"];
        let mut w = watcher(&urls);
        let now = Instant::now();
        let (a, b) = (conn(1), conn(2));
        w.open(a, "10.0.0.1".parse().unwrap());
        w.up(a, &submit(1), now);
        assert!(w.down(a, &reply(1, true), now).is_some());
        // b: an authorisation and a submit pending.
        w.open(b, "10.0.0.2".parse().unwrap());
        w.up(
            b,
            br#"{"id":2,"method":"mining.authorize","params":["u.w","x"]}"#,
            now,
        );
        w.up(b, &submit(3), now);
        let (xa, xb) = (w.export(a, now), w.export(b, now));
        assert!(xa.is_null(), "a was redirected: not watched");
        assert!(w.miners.is_empty());
        let state = w.shared.export_state();

        let mut n = watcher(&urls);
        n.shared.import_state(&state).unwrap();
        assert_eq!(n.shared.stats(), w.shared.stats());
        let (a2, b2) = (conn(7), conn(8));
        assert!(n.adopt(a2, &xa, now) && n.adopt(b2, &xb, now));
        assert!(!n.miners.contains_key(&a2));
        // b's share reply, after the handover: redirected to the next address.
        let l = n.down(b2, &reply(3, true), now).unwrap();
        assert!(find(&l, b"\"4002\""), "{l:?}");
        // 10.0.0.1 sticks to the first address in the new instance too.
        let c = conn(9);
        n.open(c, "10.0.0.1".parse().unwrap());
        assert!(find(&authorize(&mut n, c, now).unwrap(), b"\"4001\""));
        assert!(!n.adopt(conn(10), &json!({"ip": "x"}), now));
        // Other addresses: the table is not taken.
        let other = watcher(&["127.0.0.1:4003"]);
        other.shared.import_state(&state).unwrap();
        assert_eq!(other.shared.stats()["ips"], 0);
    }

    #[test]
    fn submit_ids_expire_and_stay_bounded() {
        let mut w = watcher(&["127.0.0.1:4001"]);
        let t0 = Instant::now();
        let a = conn(1);
        w.open(a, "10.0.0.1".parse().unwrap());
        w.up(a, &submit(1), t0);
        assert_eq!(w.down(a, &reply(1, true), t0 + SUBMIT_WINDOW), None);
        for i in 0..1000 {
            w.up(a, &submit(100 + i), t0);
        }
        assert_eq!(w.miners[&a].submits.len(), MAX_SUBMITS);
        // A submit's params naming methods do not make it an authorize.
        w.up(
            a,
            br#"{"id":3,"method":"mining.submit","params":["mining.authorize","1","00","00","00"]}"#,
            t0,
        );
        assert!(w.miners[&a].auths.is_empty());
        w.close(a);
        assert_eq!(w.down(a, &reply(3, true), t0), None);
    }
}
