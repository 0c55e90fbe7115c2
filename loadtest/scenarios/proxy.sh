#!/usr/bin/env bash
# Scenario "proxy" (issue #15): ckload through a proxy (`-p`) against ckload direct to the pool,
# same batch. One pool on the regtest node pair (BENCH_PORT) and one proxy (PROXY_PORT) whose
# `proxy` entry is the pool's stratum port. PROXY_REPS rounds; in each, one ckload steady run of
# PROXY_MINERS miners at PROXY_RATE shares/s for PROXY_SECONDS s (after a PROXY_RAMP s ramp)
# direct to the pool and one through the proxy, the order alternating from round to round; a
# fresh pool (and proxy) for every run.
#
# Per run, over ckload's measurement window (the end of the ramp to the end of the submits):
#   - the pool's CPU per share it accepted (/proc/PID/stat and its admin `stats` `accepted`,
#     sampled at the window's start and end);
#   - the proxy's CPU per share it accepted from its miners (ckload --pool-pid on the proxy);
#   - submit p50 and p99 (ckload's window);
#   - shares the proxy forwarded upstream in the window and how many the pool accepted (the
#     proxy's admin `stats` `upstreams`: accepted + rejected + lost, and accepted);
#   - errors: ckload's error count, rejects, unexpected replies; upstream rejects, lost shares
#     and shares the proxy dropped (`upstreams.dropped`).
# Then the medians of the rounds and the ratios: proxy CPU per share against the pool's (direct),
# p99 and p50 through the hop against direct and the p99 the hop adds.
#
# Difficulty: the proxy's miners work at 2^-32 (the proxy's own mindiff = startdiff = maxdiff:
# every hash is a share, and ckload skips the half that are regtest blocks), so the proxy checks
# every share locally; what it forwards is decided by the pool's difficulty (the upstream's).
# The pool runs at 2^-32 too (lib.sh's BENCH_DIFF), so every share is forwarded: the proxy's
# heaviest case, and the pool sees the same share rate in both legs. No fraction in between is
# possible on regtest: difficulties are whole multiples of 2^-32, and the next one, 2^-31, has
# regtest's network target (~2^255), which the shares ckload sends never meet (they are not
# blocks), so nothing would be forwarded. The output says the pool's difficulty and the
# forwarded fraction measured.
#
# Environment (defaults in brackets): PROXY_MINERS [10000], PROXY_RATE [10000], PROXY_SECONDS
# [60], PROXY_RAMP [miners / 1500 + 5 s], PROXY_REPS [3], PROXY_WORKERS [one per 10,000 miners,
# at least 2], PROXY_PORT [3661]; BENCH_IO [$POOL_BACKEND, else epoll] for the
# pool and the proxy; the regtest nodes on their own ports (REGTEST_RPC_PORT1 [19943] and the
# others 1500 above the defaults of scripts/regtest-node.sh), the pool on BENCH_PORT [3660]; and
# those of lib.sh (BENCH_POOL_BIN, BENCH_CKPMSG_BIN, BENCH_CKLOAD_BIN, BENCH_NO_BUILD, ...).
set -euo pipefail
SCENARIO=proxy
: "${BENCH_IO:=${POOL_BACKEND:-epoll}}"
: "${BENCH_PORT:=3660}"
export BENCH_IO BENCH_PORT
export REGTEST_RPC_PORT1=${REGTEST_RPC_PORT1:-19943} REGTEST_RPC_PORT2=${REGTEST_RPC_PORT2:-19953}
export REGTEST_P2P_PORT1=${REGTEST_P2P_PORT1:-19944} REGTEST_P2P_PORT2=${REGTEST_P2P_PORT2:-19954}
export REGTEST_ZMQ_PORT=${REGTEST_ZMQ_PORT:-29932}
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MINERS=${PROXY_MINERS:-10000}
RATE=${PROXY_RATE:-10000}
SECS=${PROXY_SECONDS:-60}
RAMP=${PROXY_RAMP:-$((MINERS / 1500 + 5))}
REPS=${PROXY_REPS:-3}
WORKERS=${PROXY_WORKERS:-$(((MINERS + 9999) / 10000))}
((WORKERS >= 2)) || WORKERS=2
PROXY_PORT=${PROXY_PORT:-3661}
# ckload starts its miners this long after it is started (its START_DELAY).
START_DELAY=1.5
# nap SECONDS: sleep in the background and wait for it, so that ^C or TERM is handled at once
# (bash runs a trap only once the foreground command is done).
nap() {
	sleep "$1" &
	wait "$!"
}
for v in MINERS SECS RAMP REPS WORKERS PROXY_PORT; do
	if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
		echo "proxy: $v must be a whole number (got '${!v}')" >&2
		exit 2
	fi
done
ulimit -n "$(ulimit -Hn)"

proxy_pid=""

# shellcheck disable=SC2317 # called from stop_all and bench_cleanup
proxy_stop() {
	if [[ -n $proxy_pid ]] && kill -0 "$proxy_pid" 2>/dev/null; then
		"$CKPMSG" -s "$DIR/proxy" shutdown >/dev/null 2>&1 || kill "$proxy_pid" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$proxy_pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$proxy_pid" 2>/dev/null || true
		wait "$proxy_pid" 2>/dev/null || true
	fi
	proxy_pid=""
}

# Called by lib.sh's cleanup (exit, ^C): ckload's workers, then the proxy.
# shellcheck disable=SC2317 # called from bench_cleanup
scenario_cleanup() {
	local child
	if [[ -n $ckload_pid ]] && kill -0 "$ckload_pid" 2>/dev/null; then
		for child in $(pgrep -P "$ckload_pid" 2>/dev/null || true); do
			kill "$child" 2>/dev/null || true
		done
	fi
	proxy_stop
}

# proxy_start: the proxy on PROXY_PORT, its upstream the pool; returns once its upstream
# connection is active with a job.
proxy_start() {
	cat >"$DIR/proxy.conf" <<CONF
{
"proxy" : [ { "url" : "127.0.0.1:$PORT", "auth" : "proxybench", "pass" : "x" } ],
"serverurl" : [ "127.0.0.1:$PROXY_PORT" ],
"mindiff" : $MINDIFF,
"startdiff" : $MINDIFF,
"maxdiff" : $MINDIFF,
"maxlinelength" : 4096,
"threads" : $THREADS,
"logdir" : "$DIR/logs-proxy"
}
CONF
	log "starting the proxy on 127.0.0.1:$PROXY_PORT"
	"${SERVER_PREFIX[@]}" "$POOL" -p -c "$DIR/proxy.conf" -s "$DIR/proxy" -n "bench-proxy-p" -k -q --io "$IO" \
		>"$DIR/proxy.log" 2>&1 &
	proxy_pid=$!
	for _ in $(seq 1 300); do
		if "$CKPMSG" -s "$DIR/proxy" stats 2>/dev/null |
			python3 -c 'import json,sys; u=json.load(sys.stdin)["upstreams"]; c=u["connections"][0]; sys.exit(0 if c["state"]=="active" and u["difficulty"] else 1)' 2>/dev/null; then
			return 0
		fi
		if ! kill -0 "$proxy_pid" 2>/dev/null; then
			cat "$DIR/proxy.log" >&2
			log "the proxy exited during start-up"
			exit 1
		fi
		sleep 0.1
	done
	"$CKPMSG" -s "$DIR/proxy" stats >&2 || true
	log "the proxy's upstream did not come up within 30 s"
	exit 1
}

# sample OUT: the pool's CPU seconds and accepted shares, and the proxy's upstream counters, as
# JSON.
sample() {
	python3 - "$1" "$(getconf CLK_TCK)" "$CKPMSG" "$DIR" "$pool_pid" "${proxy_pid:-0}" <<'PY'
import json, subprocess, sys, time
out, tck, ckpmsg, d, pool, proxy = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
def cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            x = f.read().rsplit(")", 1)[1].split()
        return (int(x[11]) + int(x[12])) / tck
    except (OSError, IndexError, ValueError):
        return 0.0
def stats(sock):
    try:
        return json.loads(subprocess.run([ckpmsg, "-s", sock, "stats"], capture_output=True, text=True, timeout=10).stdout)
    except Exception:
        return {}
r = {"t": time.monotonic(), "pool_cpu": cpu(pool), "pool": stats(f"{d}/sock")}
if proxy != "0":
    r["proxy_cpu"] = cpu(proxy)
    r["proxy"] = stats(f"{d}/proxy")
json.dump(r, open(out, "w"))
PY
}

# one_run PATH NAME: a fresh pool (and proxy), one ckload run direct or through the proxy, the
# samples at the window's start and end.
one_run() {
	local path=$1 name=$2 target pid t0
	pool_stop
	pool_start --io "$IO"
	target=$PORT
	pid=$pool_pid
	if [[ $path == proxy ]]; then
		proxy_start
		target=$PROXY_PORT
		pid=$proxy_pid
	fi
	log "$name: ckload steady, $MINERS miners, $RATE shares/s, $path"
	t0=$(date +%s.%N)
	"${CKLOAD_PREFIX[@]}" "$CKLOAD" steady --url "127.0.0.1:$target" --miners "$MINERS" --workers "$WORKERS" \
		--rate "$RATE" --ramp "$RAMP" --duration "$((RAMP + SECS))" --pool-pid "$pid" --quiet \
		--json "$DIR/$name.json" >"$DIR/$name.txt" 2>&1 &
	ckload_pid=$!
	nap "$(python3 -c "import time; print(max(0.0, $t0 + $START_DELAY + $RAMP - time.time()))")"
	sample "$DIR/$name-w0.json"
	nap "$(python3 -c "import time; print(max(0.0, $t0 + $START_DELAY + $RAMP + $SECS - 0.3 - time.time()))")"
	sample "$DIR/$name-w1.json"
	local status=0
	wait "$ckload_pid" || status=$?
	ckload_pid=""
	((status == 0)) || log "$name: ckload exited $status (see $DIR/$name.txt)"
	proxy_stop
	pool_stop
}

bench_setup
names=()
for rep in $(seq 1 "$REPS"); do
	if ((rep % 2)); then
		order=(direct proxy)
	else
		order=(proxy direct)
	fi
	for path in "${order[@]}"; do
		one_run "$path" "$path-$rep"
		names+=("$path-$rep")
	done
done

printf '\nproxy: %s; %s miners, %s shares/s, %s s window, ramp %s s, %s ckload workers, io %s, %s connector threads; proxy miners at difficulty 2^-32, pool (upstream) difficulty %s\n\n' \
	"$(machine)" "$MINERS" "$RATE" "$SECS" "$RAMP" "$WORKERS" "$IO" "$THREADS" "$POOL_DIFF"
report_status=0
python3 - "$DIR" "${names[@]}" <<'PY' || report_status=$?
import json, os, statistics, sys
d, names = sys.argv[1], sys.argv[2:]
load = lambda n: json.load(open(os.path.join(d, n)))
rows, bad = [], []
for n in names:
    path = n.split("-")[0]
    try:
        r, a, b = load(f"{n}.json"), load(f"{n}-w0.json"), load(f"{n}-w1.json")
    except (OSError, ValueError) as e:
        bad.append(f"{n}: no report ({e})")
        continue
    c = r["counters"]
    errs = (c["connect_failures"] + c["subscribe_failures"] + c["authorize_failures"] + c["handshake_timeouts"]
            + c["disconnects"] + c["protocol_errors"] + c["unanswered"] + len(r["worker_failures"])
            + c["rejected"] + r["unexpected_replies"])
    pool_acc = b["pool"].get("accepted", 0) - a["pool"].get("accepted", 0)
    pool_cpu = b["pool_cpu"] - a["pool_cpu"]
    row = {"run": n, "path": path, "accepted_per_sec": r["rates"]["accepted_per_sec"],
           "pool_us_per_share": 1e6 * pool_cpu / max(1, pool_acc), "pool_accepted": pool_acc,
           "p50_ms": r["latency"]["submit_window"]["p50_us"] / 1000, "p99_ms": r["latency"]["submit_window"]["p99_us"] / 1000,
           "steal_pct": r["machine"]["steal_pct_window"], "busy_pct": r["machine"]["busy_pct_window"],
           "local_accepted": c["hold_accepted"]}
    if path == "proxy":
        row["proxy_us_per_share"] = 1e6 * r["pool"]["cpu_secs"] / max(1, c["hold_accepted"])
        row["proxy_rss_mib"] = r["pool"]["rss_kib_end"] / 1024
        def up(s):
            u = s.get("proxy", {}).get("upstreams", {})
            srv = u.get("servers") or []
            return (sum(x.get("accepted", 0) for x in srv), sum(x.get("rejected", 0) for x in srv),
                    sum(x.get("lost", 0) for x in srv), u.get("dropped", 0), s.get("proxy", {}).get("accepted", 0))
        (a_acc, a_rej, a_lost, a_drop, a_loc), (b_acc, b_rej, b_lost, b_drop, b_loc) = up(a), up(b)
        row["forwarded"] = (b_acc + b_rej + b_lost) - (a_acc + a_rej + a_lost)
        row["upstream_accepted"] = b_acc - a_acc
        # against the shares the proxy accepted from its miners between the same two samples
        row["forwarded_fraction"] = row["forwarded"] / max(1, b_loc - a_loc)
        errs += (b_rej - a_rej) + (b_lost - a_lost) + (b_drop - a_drop)
    row["errors"] = errs
    if errs:
        bad.append(f"{n}: {errs} errors (ckload {r['errors']}, rejects {r['rejected_by_reason']}, unexpected {r['unexpected_replies']})")
    rows.append(row)

f = lambda v, fmt="%.2f": "-" if v is None else fmt % v
print("| run | path | accepted shares/s | pool CPU µs per share | proxy CPU µs per share | submit p50 ms | submit p99 ms | forwarded upstream (fraction) | accepted upstream | errors | busy % / steal % |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for x in rows:
    fw = f"{x['forwarded']} ({x['forwarded_fraction']:.3f})" if "forwarded" in x else "-"
    print(f"| {x['run']} | {x['path']} | {x['accepted_per_sec']:.0f} | {x['pool_us_per_share']:.2f} | {f(x.get('proxy_us_per_share'))} | "
          f"{x['p50_ms']:.2f} | {x['p99_ms']:.2f} | {fw} | {x.get('upstream_accepted', '-')} | {x['errors']} | "
          f"{x['busy_pct']:.0f} / {x['steal_pct']:.1f} |")
med = lambda path, k: statistics.median([x[k] for x in rows if x["path"] == path and k in x]) if any(x["path"] == path and k in x for x in rows) else None
summary = {k: {p: med(p, k) for p in ("direct", "proxy")} for k in ("pool_us_per_share", "proxy_us_per_share", "p50_ms", "p99_ms", "accepted_per_sec", "forwarded_fraction")}
print()
print("| median of the rounds | direct | through the proxy | ratio |")
print("| --- | --- | --- | --- |")
s = summary
ratio = lambda x, y: f"{x / y:.2f}x" if x is not None and y else "-"
print(f"| pool CPU µs per share it accepted | {f(s['pool_us_per_share']['direct'])} | {f(s['pool_us_per_share']['proxy'])} | {ratio(s['pool_us_per_share']['proxy'], s['pool_us_per_share']['direct'])} |")
print(f"| proxy CPU µs per share (its miners' shares), against the pool's direct | - | {f(s['proxy_us_per_share']['proxy'])} | {ratio(s['proxy_us_per_share']['proxy'], s['pool_us_per_share']['direct'])} |")
print(f"| submit p50 ms | {f(s['p50_ms']['direct'])} | {f(s['p50_ms']['proxy'])} | {ratio(s['p50_ms']['proxy'], s['p50_ms']['direct'])} |")
print(f"| submit p99 ms | {f(s['p99_ms']['direct'])} | {f(s['p99_ms']['proxy'])} | {ratio(s['p99_ms']['proxy'], s['p99_ms']['direct'])} |")
if s["p99_ms"]["direct"] is not None and s["p99_ms"]["proxy"] is not None:
    print(f"\np99 added by the hop: {s['p99_ms']['proxy'] - s['p99_ms']['direct']:.2f} ms; p50 added: {s['p50_ms']['proxy'] - s['p50_ms']['direct']:.2f} ms; "
          f"shares forwarded upstream: {f(s['forwarded_fraction']['proxy'], '%.3f')} of the proxy's accepted (median)")
print(f"errors: {len(bad)}" + "".join(f"\n  - {b}" for b in bad))
json.dump({"runs": rows, "medians": summary, "errors": bad}, open(os.path.join(d, "proxy.json"), "w"), indent=1)
print(f"\nwritten: {d}/proxy.json")
sys.exit(1 if bad else 0)
PY
exit "$report_status"
