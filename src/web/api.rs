//! `/api/...`: the admin socket's statistics as JSON, in views (one snapshot each).

use serde_json::{Map, Value, json};

use super::{PoolCtx, Reply};

/// The reply for `/api/<rest>`; `None` for an unknown path or name.
pub(super) fn route(rest: &str, ctx: &PoolCtx) -> Option<Reply> {
    let (what, name) = match rest.split_once('/') {
        Some((w, n)) => (w, Some(percent_decode(n)?)),
        None => (rest, None),
    };
    let v = match (what, name) {
        ("pool", None) => pool(ctx),
        ("users", None) => users(ctx),
        ("users", Some(n)) => user(ctx, &n)?,
        ("workers", None) => workers(ctx),
        ("workers", Some(n)) => worker(ctx, &n)?,
        ("clients", None) => clients(ctx),
        ("blocks", None) => blocks(ctx),
        ("upstreams", None) => upstreams(ctx),
        _ => return None,
    };
    Some(Reply::json(&v))
}

/// `/api/history`: `[[unix seconds, hashrate], ...]`, oldest first.
pub(super) fn history(h: &std::collections::VecDeque<(u64, f64)>) -> Reply {
    let points: Vec<Value> = h.iter().map(|&(t, r)| json!([t, r])).collect();
    Reply::json(&json!({ "every": super::HISTORY_EVERY.as_secs(), "points": points }))
}

/// The pool's figures as the admin socket's `stats` gives them, without the users (see
/// `/api/users`), plus the connections and the uptime.
fn pool(ctx: &PoolCtx) -> Value {
    let s = ctx.pool.stats();
    let users = s.users.len();
    let workers: usize = s.users.values().map(|u| u.workers.len()).sum();
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("users");
        obj.insert("users".into(), users.into());
        obj.insert("workers".into(), workers.into());
        obj.insert("server".into(), ctx.generator.active().into());
        obj.insert("io".into(), ctx.io.clone().into());
        obj.insert("handoff".into(), ctx.handoff.clone().into());
        obj.insert("uptime".into(), ctx.started.elapsed().as_secs().into());
        let open: u64 = ctx.conns.counters().iter().map(|c| c.open).sum();
        obj.insert("connections".into(), open.into());
        if let Some(log) = &ctx.share_log {
            obj.insert(
                "sharelog".into(),
                serde_json::to_value(log.snapshot()).unwrap_or_default(),
            );
        }
    }
    v
}

/// Users by name, each with its figures and the number of its workers (not the workers
/// themselves: see `/api/users/<name>`).
fn users(ctx: &PoolCtx) -> Value {
    let s = ctx.pool.stats();
    let mut out = Map::new();
    for (name, u) in &s.users {
        let mut v = serde_json::to_value(u).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("workers".into(), u.workers.len().into());
        }
        out.insert(name.clone(), v);
    }
    Value::Object(out)
}

fn user(ctx: &PoolCtx, name: &str) -> Option<Value> {
    let s = ctx.pool.stats();
    let u = s.users.get(name)?;
    let mut v = serde_json::to_value(u).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("user".into(), name.into());
    }
    Some(v)
}

/// Workers by full name, each with its figures and its user.
fn workers(ctx: &PoolCtx) -> Value {
    let s = ctx.pool.stats();
    let mut out = Map::new();
    for (uname, u) in &s.users {
        for (wname, w) in &u.workers {
            let mut v = serde_json::to_value(w).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("user".into(), uname.clone().into());
            }
            out.insert(wname.clone(), v);
        }
    }
    Value::Object(out)
}

fn worker(ctx: &PoolCtx, name: &str) -> Option<Value> {
    let s = ctx.pool.stats();
    s.users.iter().find_map(|(uname, u)| {
        let w = u.workers.get(name)?;
        let mut v = serde_json::to_value(w).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("user".into(), uname.clone().into());
            obj.insert("worker".into(), name.into());
        }
        Some(v)
    })
}

/// Connections: the pool's client count and each connector thread's counters.
fn clients(ctx: &PoolCtx) -> Value {
    let s = ctx.pool.stats();
    let threads: Vec<Value> = ctx
        .conns
        .counters()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "thread": i,
                "open": c.open,
                "accepted": c.accepted,
                "refused": c.refused,
                "adopted": c.adopted,
                "exported": c.exported,
                "closed": c.closed.total(),
                "slow_rounds": c.slow_rounds,
                "queued": c.queued,
                "paused": c.paused,
                "pauses": c.pauses,
            })
        })
        .collect();
    json!({
        "clients": s.clients,
        "disconnected": s.disconnected,
        "threads": threads,
    })
}

fn blocks(ctx: &PoolCtx) -> Value {
    let s = ctx.pool.stats();
    json!({
        "count": s.blocks.len(),
        "blocks": s.blocks,
        "height": s.job.as_ref().map(|j| j.1),
        "network_diff": s.job.as_ref().map(|j| j.2),
    })
}

/// The bitcoinds in priority order and which one is active; in proxy modes the admin
/// `upstreams` view (the `proxy` entries and every upstream connection).
fn upstreams(ctx: &PoolCtx) -> Value {
    if let Some(view) = &ctx.upstreams {
        return view();
    }
    let active = ctx.generator.active();
    let servers: Vec<Value> = ctx
        .servers
        .iter()
        .enumerate()
        .map(|(i, url)| json!({ "index": i, "url": url, "active": active == Some(i) }))
        .collect();
    json!({ "mode": "pool", "active": active, "servers": servers })
}

/// Decodes `%XX` escapes (and nothing else); `None` if malformed or not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_escapes_are_decoded_and_bad_ones_refused() {
        assert_eq!(percent_decode("a.b_c").as_deref(), Some("a.b_c"));
        assert_eq!(
            percent_decode("bc1q%2Erig%201").as_deref(),
            Some("bc1q.rig 1")
        );
        assert_eq!(percent_decode("x%2"), None);
        assert_eq!(percent_decode("x%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
