//! ckpool's client and query commands on the admin socket: `accept`, `reject`,
//! `reconnect[:url,port]`, `dropclient=ID`, `reconnclient=ID`, `dropall`, `resetshares`,
//! `connectorstats`, and the JSON queries ckpool leaves as stubs, answered here with real data:
//! `clients`, `getclient`, `userclients`, `workerclients`, `users`, `getuser`, `workers`,
//! `getworker`, `poolstats`, `uptime`.
//!
//! A client's admin id is its connection's id as a number (shown as `id` by `clients`); it
//! names the connector thread that owns it, so `dropclient` goes to that thread alone. Lists
//! are capped at [`MAX_LISTED`] entries; each reply says how many there are in all (`count`)
//! and the cap (`max`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ConnId;
use serde_json::{Map, Value, json};
use stratifier::{ClientInfo, ReconnectTo};
use tracing::{info, warn};

use super::AdminCtx;
use crate::handoff::{Msg, ShardCmd};

/// The most entries a list reply holds (clients, users, workers).
pub(crate) const MAX_LISTED: usize = 1_000;
/// How long a `clients` query waits for the shards' answers.
const QUERY_WAIT: Duration = Duration::from_secs(2);

/// What to send back.
pub(crate) enum Reply {
    Text(Vec<u8>),
    /// Close with no reply (ckpool's stratifier commands).
    None,
    /// Not one of these commands.
    Unknown,
}

fn text(s: impl Into<String>) -> Reply {
    Reply::Text(s.into().into_bytes())
}

fn json_reply(v: &Value) -> Reply {
    Reply::Text(v.to_string().into_bytes())
}

/// Splits `name={json}` (or `name{json}`) into the JSON object; `None` if `cmd` is not `name`.
fn args<'a>(cmd: &'a str, name: &str) -> Option<Result<Map<String, Value>, &'a str>> {
    let rest = cmd.strip_prefix(name)?;
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    if rest.is_empty() {
        return Some(Err("missing arguments"));
    }
    if !rest.starts_with('{') {
        return None;
    }
    Some(match serde_json::from_str::<Value>(rest) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err("invalid JSON"),
    })
}

fn error(msg: &str) -> Reply {
    json_reply(&json!({ "error": msg }))
}

/// Runs one of this module's commands.
pub(crate) fn command(cmd: &str, ctx: &AdminCtx, started: Instant) -> Reply {
    match cmd {
        "resetshares" => {
            ctx.pool.registry().reset_best_shares();
            info!("admin: best shares reset");
            return text("resetting");
        }
        "poolstats" => return poolstats(ctx),
        "uptime" => return json_reply(&json!({ "uptime": started.elapsed().as_secs() })),
        "users" => return users(ctx),
        "workers" => return workers(ctx),
        _ => {}
    }
    if let Some(a) = args(cmd, "getuser") {
        return match a {
            Ok(m) => match m.get("user").and_then(Value::as_str) {
                Some(u) => getuser(ctx, u),
                None => error("no user given"),
            },
            Err(e) => error(e),
        };
    }
    if let Some(a) = args(cmd, "getworker") {
        return match a {
            Ok(m) => match m.get("worker").and_then(Value::as_str) {
                Some(w) => getworker(ctx, w),
                None => error("no worker given"),
            },
            Err(e) => error(e),
        };
    }
    let Some(conns) = &ctx.conns else {
        return Reply::Unknown;
    };
    match cmd {
        "accept" => {
            if !conns.set_accepting(true) {
                warn!("admin: a connector thread did not confirm accept within a second");
            }
            info!("admin: accepting new connections");
            return text("accepting");
        }
        "reject" => {
            if !conns.set_accepting(false) {
                warn!("admin: a connector thread did not confirm reject within a second");
            }
            info!("admin: rejecting new connections");
            return text("rejecting");
        }
        "dropall" => {
            conns.broadcast(Msg::Cmd(ShardCmd::DropAll { reconnect: None }));
            info!("admin: dropping every client");
            return Reply::None;
        }
        "connectorstats" => return connectorstats(conns),
        "clients" => return clients(ctx, None, None),
        _ => {}
    }
    if cmd == "reconnect" || cmd.starts_with("reconnect:") {
        let to = match cmd.strip_prefix("reconnect:") {
            None => None,
            Some(arg) => match parse_target(arg) {
                Some(t) => Some(t),
                None => {
                    warn!(arg, "admin: reconnect needs <url>,<port>");
                    return text("Invalid");
                }
            },
        };
        info!(to = ?to, "admin: reconnecting every client");
        let reconnect = Some(Arc::new(ReconnectTo { to }));
        conns.broadcast(Msg::Cmd(ShardCmd::DropAll { reconnect }));
        return text("reconnecting");
    }
    for (name, reconnect) in [("dropclient=", false), ("reconnclient=", true)] {
        if let Some(id) = cmd.strip_prefix(name) {
            match id.trim().parse::<u64>() {
                Ok(id) => {
                    let conn = ConnId(id);
                    let reconnect = reconnect.then(|| Arc::new(ReconnectTo::default()));
                    conns.send(
                        usize::from(conn.thread()),
                        Msg::Cmd(ShardCmd::Drop { conn, reconnect }),
                    );
                }
                Err(_) => warn!(cmd, "admin: a client id is a number"),
            }
            return Reply::None;
        }
    }
    if let Some(a) = args(cmd, "getclient") {
        return match a {
            Ok(m) => match m.get("id").and_then(Value::as_u64) {
                Some(id) => getclient(ctx, id),
                None => error("no id given"),
            },
            Err(e) => error(e),
        };
    }
    if let Some(a) = args(cmd, "userclients") {
        return match a {
            Ok(m) => match m.get("user").and_then(Value::as_str) {
                Some(u) => clients(ctx, Some(u), None),
                None => error("no user given"),
            },
            Err(e) => error(e),
        };
    }
    if let Some(a) = args(cmd, "workerclients") {
        return match a {
            Ok(m) => match m.get("worker").and_then(Value::as_str) {
                Some(w) => clients(ctx, None, Some(w)),
                None => error("no worker given"),
            },
            Err(e) => error(e),
        };
    }
    Reply::Unknown
}

/// `<url>,<port>`.
fn parse_target(arg: &str) -> Option<(String, u16)> {
    let (url, port) = arg.trim().rsplit_once(',')?;
    let url = url.trim();
    if url.is_empty() || url.len() > 255 {
        return None;
    }
    Some((url.to_owned(), port.trim().parse().ok()?))
}

/// Asks every shard for its clients (`only`: one client) and gathers the answers.
fn gather(ctx: &AdminCtx, max: usize, only: Option<ConnId>) -> Option<(usize, Vec<ClientInfo>)> {
    let conns = ctx.conns.as_ref()?;
    let threads = conns.threads();
    if only.is_some_and(|c| usize::from(c.thread()) >= threads) {
        // No thread of that number: no such client.
        return Some((0, Vec::new()));
    }
    let (reply, rx) = crossbeam_channel::bounded(threads);
    let cmd = ShardCmd::Clients { max, only, reply };
    match only {
        Some(c) => conns.send(usize::from(c.thread()), Msg::Cmd(cmd)),
        None => conns.broadcast(Msg::Cmd(cmd)),
    }
    let expect = if only.is_some() { 1 } else { threads };
    let deadline = Instant::now() + QUERY_WAIT;
    let (mut total, mut all) = (0, Vec::new());
    for _ in 0..expect {
        let (n, list) = rx.recv_deadline(deadline).ok()?;
        total += n;
        all.extend(list.into_iter().take(max.saturating_sub(all.len())));
    }
    Some((total, all))
}

/// `clients`, `userclients` (`user`) and `workerclients` (`worker`).
fn clients(ctx: &AdminCtx, user: Option<&str>, worker: Option<&str>) -> Reply {
    // Filtered lists look at every client (the filter runs here, bounded by the cap below).
    let filtered = user.is_some() || worker.is_some();
    let max = if filtered { usize::MAX } else { MAX_LISTED };
    let Some((total, list)) = gather(ctx, max, None) else {
        return error("the stratifier did not answer");
    };
    let (count, list): (usize, Vec<ClientInfo>) = if filtered {
        let matching: Vec<ClientInfo> = list
            .into_iter()
            .filter(|c| {
                user.is_none_or(|u| c.user.as_deref() == Some(u))
                    && worker.is_none_or(|w| c.worker.as_deref() == Some(w))
            })
            .collect();
        let n = matching.len();
        (n, matching.into_iter().take(MAX_LISTED).collect())
    } else {
        (total, list)
    };
    json_reply(&json!({ "clients": list, "count": count, "max": MAX_LISTED }))
}

/// `getclient={"id":N}`.
fn getclient(ctx: &AdminCtx, id: u64) -> Reply {
    match gather(ctx, 1, Some(ConnId(id))) {
        Some((_, list)) => match list.into_iter().next() {
            Some(c) => json_reply(&json!({ "client": c })),
            None => error("no such client"),
        },
        None => error("no such client"),
    }
}

/// The user's stats without its workers' table, and the number of workers.
fn user_summary(u: &stratifier::UserStats) -> Value {
    let mut v = serde_json::to_value(u).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("workers");
        o.insert("workers".into(), u.workers.len().into());
    }
    v
}

/// `users`: the busiest [`MAX_LISTED`] users (by 1-minute hashrate).
fn users(ctx: &AdminCtx) -> Reply {
    let registry = ctx.pool.registry();
    let snap = registry.snapshot_top(MAX_LISTED);
    let users: Map<String, Value> = snap
        .users
        .iter()
        .map(|(name, u)| (name.clone(), user_summary(u)))
        .collect();
    json_reply(&json!({ "users": users, "count": registry.users(), "max": MAX_LISTED }))
}

/// `workers`: the workers of the busiest users, [`MAX_LISTED`] at most.
fn workers(ctx: &AdminCtx) -> Reply {
    let snap = ctx.pool.registry().snapshot();
    let count: usize = snap.users.values().map(|u| u.workers.len()).sum();
    let mut users: Vec<_> = snap.users.into_iter().collect();
    users.sort_by(|(an, a), (bn, b)| {
        b.hashrate
            .hashrate1m
            .total_cmp(&a.hashrate.hashrate1m)
            .then(an.cmp(bn))
    });
    let mut workers = Map::new();
    'all: for (_, u) in users {
        for (name, w) in u.workers {
            if workers.len() >= MAX_LISTED {
                break 'all;
            }
            workers.insert(name, serde_json::to_value(w).unwrap_or_default());
        }
    }
    json_reply(&json!({ "workers": workers, "count": count, "max": MAX_LISTED }))
}

/// `getuser={"user":"name"}`: the user's stats and (up to [`MAX_LISTED`]) workers.
fn getuser(ctx: &AdminCtx, user: &str) -> Reply {
    let mut snap = ctx.pool.registry().snapshot();
    let Some(mut u) = snap.users.remove(user) else {
        return error("no such user");
    };
    let count = u.workers.len();
    let workers: Map<String, Value> = std::mem::take(&mut u.workers)
        .into_iter()
        .take(MAX_LISTED)
        .map(|(n, w)| (n, serde_json::to_value(w).unwrap_or_default()))
        .collect();
    let mut v = user_summary(&u);
    if let Some(o) = v.as_object_mut() {
        o.insert("user".into(), user.into());
        o.insert("workers".into(), Value::Object(workers));
        o.insert("worker_count".into(), count.into());
    }
    json_reply(&v)
}

/// `getworker={"worker":"name"}` (the user is the name up to its first `.` or `_`).
fn getworker(ctx: &AdminCtx, worker: &str) -> Reply {
    let user = worker.split(['.', '_']).next().unwrap_or(worker);
    let mut snap = ctx.pool.registry().snapshot();
    let Some(w) = snap
        .users
        .get_mut(user)
        .and_then(|u| u.workers.remove(worker))
    else {
        return error("no such worker");
    };
    let mut v = serde_json::to_value(w).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("worker".into(), worker.into());
        o.insert("user".into(), user.into());
    }
    json_reply(&v)
}

/// `poolstats`: the pool's totals and rates (no users).
fn poolstats(ctx: &AdminCtx) -> Reply {
    let registry = ctx.pool.registry();
    let mut v = serde_json::to_value(registry.snapshot_top(0)).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("users");
        o.insert("users".into(), registry.users().into());
    }
    json_reply(&v)
}

/// `connectorstats` in ckpool's shape (`clients`, `dead`, `sends`, `delays`, each `count`,
/// `memory`, `generated`, in that order and with ckpool's spacing), from the connector's
/// counters: `clients` open now / bytes queued for them / accepted or adopted ever; `dead` is
/// always 0 now (a closed connection is freed at once) with the closes and refusals ever as
/// `generated`; `sends` has the bytes queued as `memory` (the connector does not count sends);
/// `delays` counts the loop rounds slow enough to delay every connection of their thread.
/// ckpool's `memory` of clients is its per-client struct size; this connector does not count
/// memory per client, so it is 0.
fn connectorstats(conns: &connector::ConnectorHandle<Msg>) -> Reply {
    let (mut open, mut generated, mut dead, mut queued, mut slow) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for c in conns.counters() {
        open += c.open;
        generated += c.accepted + c.adopted;
        dead += c.closed.total() + c.refused;
        queued += c.queued;
        slow += c.slow_rounds;
    }
    let item = |count: u64, memory: u64, generated: u64| {
        format!("{{\"count\": {count}, \"memory\": {memory}, \"generated\": {generated}}}")
    };
    text(format!(
        "{{\"clients\": {}, \"dead\": {}, \"sends\": {}, \"delays\": {}}}",
        item(open, 0, generated),
        item(0, 0, dead),
        item(0, queued, 0),
        item(0, 0, slow),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_targets_and_query_arguments_parse() {
        assert_eq!(
            parse_target("pool.example.com,3334"),
            Some(("pool.example.com".into(), 3334))
        );
        assert_eq!(parse_target("host"), None);
        assert_eq!(parse_target(",3333"), None);
        assert_eq!(parse_target("host,99999"), None);
        let m = args(r#"getuser={"user":"a"}"#, "getuser").unwrap().unwrap();
        assert_eq!(m["user"], "a");
        assert!(args(r#"getuser{"user":"a"}"#, "getuser").unwrap().is_ok());
        assert!(args("getuser=", "getuser").unwrap().is_err());
        assert!(args("getuser={not json", "getuser").unwrap().is_err());
        assert!(args("getusers", "getuser").is_none());
        assert!(args("getclient=[1]", "getclient").is_none());
    }
}
