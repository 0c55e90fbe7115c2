#!/usr/bin/env bash
# Scenario "fleet" (issue #14): one pool on the regtest node pair, FLEET_PASSTHROUGHS passthrough
# processes (`-P`) in front of it, and FLEET_MINERS miners spread evenly over the passthroughs
# (one ckload per passthrough, its workers each on a 127.0.0.x source address of their own),
# plus a small direct group of FLEET_DIRECT miners straight to the pool at the same per-miner
# rate (its own ckload and source address): the submit p99 through the passthrough hop against
# the direct one, in the same batch. The pool listens on BENCH_PORT for ordinary miners and on
# FLEET_PTS_PORT as its `passthroughserver`; passthrough i listens on FLEET_PT_PORT + i.
#
# Two phases, each on a freshly started pool and passthroughs (no sessions parked from the
# phase before):
#   idle    every miner connects and authorises (ramp FLEET_RAMP s), the counts are checked
#           (each passthrough's admin `stats` `miners`; the pool's `passthroughs` links and
#           their `subclients`, its `clients`), then no submits for FLEET_IDLE s: the CPU of
#           every process from /proc/PID/stat over those seconds, as % of one core, and of the
#           fleet (pool + passthroughs) per 10,000 miners.
#   submit  the same ramp and checks, then FLEET_SECONDS s of submits at FLEET_RATE shares/s
#           over the passthroughs' miners (and the same rate per miner for the direct group):
#           each process's CPU over ckload's measurement window (ckload --pool-pid: passthrough
#           i sampled by its own ckload, the pool by the direct group's) per share accepted in
#           that window (a passthrough: its own miners' shares; the pool: every share); the
#           submit p99 of the passthroughs' miners (their histograms merged exactly) against
#           the direct group's, to when each reply arrived in the miner's socket (ckload's
#           `submit_socket`, a kernel stamp: the goal's figure) and to when ckload read it
#           (that also holds the time a reply waited for its ckload worker, which reads the
#           fan-out to 7,000 miners here and to 1,000 in the direct group, and at nice 10
#           waits for the CPU behind the servers); shares/s; errors.
# Errors: ckload's error count (connect, subscribe or authorise failures, handshake timeouts,
# disconnects, protocol errors, unanswered submits, worker failures), rejects and unexpected
# replies, and the passthroughs' `dropped_slow_upstream`, `rejected_down` and `replay_closed`.
# Prints a table and writes fleet.json and fleet.tsv in the bench directory; exits 1 if there
# was any error or a miner was missing at the count check.
#
# Goals (BENCHMARKS.md, G10): idle CPU of the fleet <= 1 % of one core per 10,000 miners;
# passthrough CPU per share <= 0.5x the pool's; submit p99 through the hop <= 1.5x direct.
#
# Limits: one process may hold 20,000 open files here (the script raises its soft limit to the
# hard one; children inherit it): a passthrough holds its miners and one upstream link, so at
# most ~19,000 miners per passthrough (the default 100,000 over 7 makes ~14,300); each ckload
# worker holds at most FLEET_WORKER_MAX miners (a ckload gets more workers than FLEET_WORKERS
# when needed).
#
# Environment (defaults in brackets): FLEET_MINERS [100000] (through the passthroughs, in all),
# FLEET_PASSTHROUGHS [7], FLEET_DIRECT [1000], FLEET_RATE [miners / 20: 0.05 share/s per
# miner, 5,000 shares/s for 100,000; one passthrough with 14,300 miners at 1,430 shares/s took
# 18 % of a core and its ckload 8 %, so 10,000 shares/s would fill both cores], FLEET_SECONDS [300], FLEET_IDLE [60], FLEET_RAMP [(miners + direct) / 1500 + 10 s],
# FLEET_GRACE [30 s after the ramp for the counts to be right], FLEET_SETTLE [5 s between the
# counts and the idle window], FLEET_WORKERS [2 per passthrough], FLEET_WORKER_MAX [9500],
# FLEET_PHASES ["idle submit"], FLEET_PT_THREADS [1: connector threads of each passthrough
# (its `threads`); with one a share's whole path is on one thread, and the least CPU per share
# and p99 here (BENCHMARKS G10); the pool keeps BENCH_THREADS], FLEET_PT_PIN [true: the
# passthroughs' `pin`, which pins only as many threads as CPUs (one thread: unpinned)], FLEET_MULTICAST [true: the passthroughs ask for multicast jobs;
# false: ckpool's framing, a notify per miner], FLEET_PTS_PORT [3641], FLEET_PT_PORT [3651], FLEET_ADDR_BASE
# [10: the direct group from 127.0.0.10, the passthroughs' ckload workers from .11 on];
# BENCH_IO [$POOL_BACKEND, else epoll] for the pool and the passthroughs; the regtest nodes on
# their own ports (REGTEST_RPC_PORT1 [19843] and the others 1400 above the defaults of
# scripts/regtest-node.sh), the pool on BENCH_PORT [3640]; and those of lib.sh
# (BENCH_POOL_BIN, BENCH_CKPMSG_BIN, BENCH_CKLOAD_BIN, BENCH_NO_BUILD, ...), BENCH_CKLOAD_NICE
# [10 here: ckload yields the CPUs to the pool and passthroughs; empty: not niced].
set -euo pipefail
SCENARIO=fleet
: "${BENCH_IO:=${POOL_BACKEND:-epoll}}"
: "${BENCH_PORT:=3640}"
PTS_PORT=${FLEET_PTS_PORT:-3641}
printf -v BENCH_EXTRA_CONF '"passthroughserver" : [ "127.0.0.1:%s" ],' "$PTS_PORT"
export BENCH_IO BENCH_PORT
export REGTEST_RPC_PORT1=${REGTEST_RPC_PORT1:-19843} REGTEST_RPC_PORT2=${REGTEST_RPC_PORT2:-19853}
export REGTEST_P2P_PORT1=${REGTEST_P2P_PORT1:-19844} REGTEST_P2P_PORT2=${REGTEST_P2P_PORT2:-19854}
export REGTEST_ZMQ_PORT=${REGTEST_ZMQ_PORT:-29832}
# ckload stands in for miners on other machines: at nice 10 it does not take the CPUs from the
# pool and passthroughs it measures (set BENCH_CKLOAD_NICE= to run it at the script's own).
BENCH_CKLOAD_NICE=${BENCH_CKLOAD_NICE-10}
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MINERS=${FLEET_MINERS:-100000}
NP=${FLEET_PASSTHROUGHS:-7}
DIRECT=${FLEET_DIRECT:-1000}
RATE=${FLEET_RATE:-$((MINERS / 20))}
SECS=${FLEET_SECONDS:-300}
IDLE=${FLEET_IDLE:-60}
RAMP=${FLEET_RAMP:-$(((MINERS + DIRECT) / 1500 + 10))}
GRACE=${FLEET_GRACE:-30}
SETTLE=${FLEET_SETTLE:-5}
WORKERS=${FLEET_WORKERS:-2}
WORKER_MAX=${FLEET_WORKER_MAX:-9500}
PHASES=${FLEET_PHASES:-idle submit}
PT_PORT=${FLEET_PT_PORT:-3651}
MULTICAST=${FLEET_MULTICAST:-true}
PT_THREADS=${FLEET_PT_THREADS:-1}
PT_PIN=${FLEET_PT_PIN:-true}
ADDR_BASE=${FLEET_ADDR_BASE:-10}
# ckload starts its miners this long after it is started (its START_DELAY).
START_DELAY=1.5
# nap SECONDS: sleep in the background and wait for it, so that ^C or TERM is handled at once
# (bash runs a trap only once the foreground command is done).
nap() {
	sleep "$1" &
	wait "$!"
}

for v in MINERS NP DIRECT SECS IDLE RAMP GRACE SETTLE WORKERS WORKER_MAX PT_PORT ADDR_BASE PT_THREADS; do
	if ! [[ ${!v} =~ ^[0-9]+$ ]]; then
		echo "fleet: $v must be a whole number (got '${!v}')" >&2
		exit 2
	fi
done
if [[ $PT_PIN != true && $PT_PIN != false ]]; then
	echo "fleet: FLEET_PT_PIN must be true or false (got '$PT_PIN')" >&2
	exit 2
fi
if ((NP < 1 || MINERS < NP || DIRECT < 1 || WORKERS < 1 || WORKER_MAX < 1 || PT_THREADS < 1)); then
	echo "fleet: need at least one passthrough, one miner per passthrough, one direct miner (the pool's CPU is sampled by its ckload) and one worker" >&2
	exit 2
fi

# Open files: every process here may hold up to the hard limit.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)

# Miners, ckload workers and source addresses of each passthrough i (PT_N, PT_W, PT_SRC).
PT_N=()
PT_W=()
PT_SRC=()
addr=$((ADDR_BASE + 1))
for ((i = 0; i < NP; i++)); do
	n=$((MINERS / NP + (i < MINERS % NP ? 1 : 0)))
	if ((n + 100 > NOFILE)); then
		echo "fleet: $n miners per passthrough do not fit its open-files limit ($NOFILE): more FLEET_PASSTHROUGHS" >&2
		exit 2
	fi
	w=$(((n + WORKER_MAX - 1) / WORKER_MAX))
	((w >= WORKERS)) || w=$WORKERS
	srcs=()
	for ((k = 0; k < w; k++)); do
		srcs+=("127.0.0.$addr")
		addr=$((addr + 1))
	done
	if ((addr > 254)); then
		echo "fleet: too many source addresses (lower FLEET_ADDR_BASE or fewer workers)" >&2
		exit 2
	fi
	PT_N+=("$n")
	PT_W+=("$w")
	PT_SRC+=("$(
		IFS=,
		echo "${srcs[*]}"
	)")
done
DIRECT_SRC=127.0.0.$ADDR_BASE
DIRECT_W=$(((DIRECT + WORKER_MAX - 1) / WORKER_MAX))

pt_pids=()
ck_pids=()
phases_run=""

# kill_tree PID: a ckload and its worker processes.
# shellcheck disable=SC2317 # called from scenario_cleanup
kill_tree() {
	local pid=$1 child
	kill -0 "$pid" 2>/dev/null || return 0
	for child in $(pgrep -P "$pid" 2>/dev/null || true); do
		kill "$child" 2>/dev/null || true
	done
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

pt_stop_all() {
	local i pid
	for i in "${!pt_pids[@]}"; do
		pid=${pt_pids[$i]}
		[[ -n $pid ]] || continue
		if kill -0 "$pid" 2>/dev/null; then
			"$CKPMSG" -s "$DIR/pt$i" shutdown >/dev/null 2>&1 || kill "$pid" 2>/dev/null || true
		fi
	done
	for i in "${!pt_pids[@]}"; do
		pid=${pt_pids[$i]}
		[[ -n $pid ]] || continue
		for _ in $(seq 1 100); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	pt_pids=()
}

# Called by lib.sh's cleanup (exit, ^C): every ckload and passthrough this script started.
# shellcheck disable=SC2317 # called from bench_cleanup
scenario_cleanup() {
	local pid
	for pid in "${ck_pids[@]}"; do
		kill_tree "$pid"
	done
	ck_pids=()
	pt_stop_all
}

# admin SOCKDIR: the admin `stats` of the pool or a passthrough, or {} (also when the reply is
# not a JSON object, such as ckpmsg's "(no reply)" from a process too busy to answer in time).
admin() {
	local out
	out=$("$CKPMSG" -s "$1" stats 2>/dev/null) || out=""
	[[ $out == "{"* ]] || out='{}'
	printf '%s\n' "$out"
}

# pt_start_all: passthrough i on 127.0.0.1:PT_PORT+i, its upstream the pool's passthroughserver
# port; returns once every one answers ping and the pool lists all of them as links.
pt_start_all() {
	local i conf
	for ((i = 0; i < NP; i++)); do
		conf=$DIR/pt$i.conf
		cat >"$conf" <<CONF
{
"serverurl" : [ "127.0.0.1:$((PT_PORT + i))" ],
"proxy" : [ { "url" : "127.0.0.1:$PTS_PORT", "auth" : "unused", "pass" : "x" } ],
"threads" : $PT_THREADS,
"pin" : $PT_PIN,
"maxlinelength" : 4096,
"multicast" : $MULTICAST,
"logdir" : "$DIR/logs-pt$i"
}
CONF
		"${SERVER_PREFIX[@]}" "$POOL" -P -c "$conf" -s "$DIR/pt$i" -n "bench-fleet-pt$i" -k -q --io "$IO" \
			>"$DIR/pt$i.log" 2>&1 &
		pt_pids[i]=$!
	done
	for ((i = 0; i < NP; i++)); do
		for _ in $(seq 1 200); do
			"$CKPMSG" -s "$DIR/pt$i" ping 2>/dev/null | grep -q pong && break
			if ! kill -0 "${pt_pids[$i]}" 2>/dev/null; then
				cat "$DIR/pt$i.log" >&2
				log "passthrough $i exited during start-up"
				exit 1
			fi
			sleep 0.1
		done
	done
	local links=0
	for _ in $(seq 1 300); do
		links=$(admin "$DIR/sock" | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("passthroughs") or []))' 2>/dev/null || echo 0)
		((links == NP)) && return 0
		sleep 0.1
	done
	log "the pool lists $links of $NP passthrough links after 30 s"
	exit 1
}

# counts: one line "ok|missing DETAILS": each passthrough's miners, the pool's links, their
# sub-clients and its clients against what is expected.
counts() {
	local args=()
	for ((i = 0; i < NP; i++)); do
		args+=("$DIR/pt$i" "${PT_N[$i]}")
	done
	python3 - "$CKPMSG" "$DIR/sock" "$DIRECT" "$NP" "${args[@]}" <<'PY'
import json, subprocess, sys
ckpmsg, pool_sock, direct, np_ = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pts = sys.argv[5:]
def stats(sock):
    try:
        out = subprocess.run([ckpmsg, "-s", sock, "stats"], capture_output=True, text=True, timeout=10).stdout
        return json.loads(out)
    except Exception:
        return {}
ok = True
have = []
want_total = 0
for k in range(0, len(pts), 2):
    s = stats(pts[k])
    n = s.get("miners", -1)
    want = int(pts[k + 1])
    want_total += want
    have.append(str(n))
    ok = ok and n == want
p = stats(pool_sock)
links = p.get("passthroughs") or []
sub = sum(l.get("subclients", 0) for l in links)
clients = p.get("clients", -1)
ok = ok and len(links) == np_ and sub == want_total and clients == want_total + direct
print(("ok" if ok else "missing") + f" passthrough miners {' '.join(have)}; pool: {len(links)} links, "
      f"{sub} sub-clients, {clients} clients (want {np_}, {want_total}, {want_total + direct})")
PY
}

# snapshot PHASE: the admin stats of the pool and every passthrough, as PHASE-stats.json.
snapshot() {
	local i
	{
		printf '{"pool": %s' "$(admin "$DIR/sock")"
		for ((i = 0; i < NP; i++)); do
			printf ', "pt%d": %s' "$i" "$(admin "$DIR/pt$i")"
		done
		printf '}\n'
	} >"$DIR/$1-stats.json"
}

# ctxt OUT: context switches (voluntary and not, over every thread) of the pool and every
# passthrough, with the time, as JSON.
ctxt() {
	local args=(pool "$pool_pid")
	for ((i = 0; i < NP; i++)); do
		args+=("pt$i" "${pt_pids[$i]}")
	done
	python3 - "$1" "${args[@]}" <<'PY'
import json, os, sys, time
out, a = sys.argv[1], sys.argv[2:]
res = {"t": time.time()}
for role, pid in zip(a[::2], a[1::2]):
    n = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                for l in open(f"/proc/{pid}/task/{t}/status"):
                    if l.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        n += int(l.split()[1])
            except OSError:
                pass
    except OSError:
        pass
    res[role] = n
json.dump(res, open(out, "w"))
PY
}

# sample OUT: CPU ticks and RSS of the pool, every passthrough and every ckload (with its
# worker processes), as JSON.
sample() {
	local args=(pool "$pool_pid")
	for ((i = 0; i < NP; i++)); do
		args+=("pt$i" "${pt_pids[$i]}")
	done
	for ((i = 0; i < ${#ck_pids[@]}; i++)); do
		args+=("ckload$i" "${ck_pids[$i]}")
	done
	python3 - "$1" "$(getconf CLK_TCK)" "${args[@]}" <<'PY'
import json, os, sys, time
out, tck, a = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def children(pid):
    try:
        kids = []
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                kids += f.read().split()
        return kids
    except OSError:
        return []
def usage(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            rss = next((int(l.split()[1]) for l in f if l.startswith("VmRSS:")), 0)
        return (int(fields[11]) + int(fields[12])) / tck, rss
    except (OSError, IndexError, ValueError):
        return 0.0, 0
r = {"t": time.monotonic()}
for k in range(0, len(a), 2):
    role, pid = a[k], a[k + 1]
    cpu, rss = usage(pid)
    if role.startswith("ckload"):
        for c in children(pid):
            c_cpu, c_rss = usage(c)
            cpu += c_cpu
            rss = max(rss, c_rss)
    r[role] = {"pid": int(pid), "cpu_secs": cpu, "rss_kib": rss}
json.dump(r, open(out, "w"))
PY
}

# phase NAME RATE: one run of every ckload (the direct group and one per passthrough) on a
# fresh pool and passthroughs; checks the counts after the ramp; for the idle phase samples the
# CPU over FLEET_IDLE s once they are right. Writes NAME-*.json and NAME-counts.txt.
phase() {
	local name=$1 rate=$2 duration i r
	if [[ $name == idle ]]; then
		duration=$((RAMP + GRACE + SETTLE + IDLE + 5))
	else
		duration=$((RAMP + SECS))
	fi
	if [[ -n $phases_run ]]; then
		pool_stop
		pool_start --io "$IO"
	fi
	phases_run+="$name "
	pt_start_all
	log "$name: $MINERS miners over $NP passthroughs and $DIRECT direct, $rate shares/s over the passthroughs' miners, ramp $RAMP s, run $duration s"
	local t0
	t0=$(date +%s.%N)
	r=$(python3 -c "print(round($rate * $DIRECT / $MINERS, 3))")
	"${CKLOAD_PREFIX[@]}" "$CKLOAD" steady --url "127.0.0.1:$PORT" --miners "$DIRECT" \
		--workers "$DIRECT_W" --source-addrs "$DIRECT_SRC" --rate "$r" --ramp "$RAMP" \
		--duration "$duration" --user direct --pool-pid "$pool_pid" --quiet \
		--json "$DIR/$name-direct.json" >"$DIR/$name-direct.txt" 2>&1 &
	ck_pids=($!)
	for ((i = 0; i < NP; i++)); do
		r=$(python3 -c "print(round($rate * ${PT_N[$i]} / $MINERS, 3))")
		"${CKLOAD_PREFIX[@]}" "$CKLOAD" steady --url "127.0.0.1:$((PT_PORT + i))" --miners "${PT_N[$i]}" \
			--workers "${PT_W[$i]}" --source-addrs "${PT_SRC[$i]}" --rate "$r" --ramp "$RAMP" \
			--duration "$duration" --user "pt$i" --pool-pid "${pt_pids[$i]}" --quiet \
			--json "$DIR/$name-pt$i.json" >"$DIR/$name-pt$i.txt" 2>&1 &
		ck_pids+=($!)
	done
	# The counts, from the end of the ramp until right or FLEET_GRACE s later.
	local ramp_end deadline line="" now
	ramp_end=$(python3 -c "print($t0 + $START_DELAY + $RAMP)")
	deadline=$(python3 -c "print($ramp_end + $GRACE)")
	nap "$(python3 -c "import time; print(max(0.0, $ramp_end - 1 - time.time()))")"
	while :; do
		line=$(counts)
		now=$(date +%s.%N)
		[[ $line == ok* ]] && break
		if python3 -c "import sys; sys.exit(0 if $now > $deadline else 1)"; then
			break
		fi
		sleep 1
	done
	local late
	late=$(python3 -c "print(round($now - $ramp_end, 1))")
	printf '%s (%s s after the ramp)\n' "$line" "$late" >"$DIR/$name-counts.txt"
	log "$name: $line ($late s after the ramp)"
	snapshot "$name"
	[[ $name == submit ]] && ctxt "$DIR/submit-ctxt-0.json"
	if [[ $name == idle && $line == ok* ]]; then
		nap "$SETTLE"
		sample "$DIR/idle-cpu-0.json"
		nap "$IDLE"
		sample "$DIR/idle-cpu-1.json"
		snapshot idle-end
	fi
	local status=0
	for pid in "${ck_pids[@]}"; do
		wait "$pid" || status=1
	done
	ck_pids=()
	[[ $name == submit ]] && ctxt "$DIR/submit-ctxt-1.json"
	((status == 0)) || log "$name: a ckload exited with an error (see $DIR/$name-*.txt)"
	snapshot "$name-after"
	pt_stop_all
}

bench_setup
for ph in $PHASES; do
	case $ph in
	idle) phase idle 0 ;;
	submit) phase submit "$RATE" ;;
	*)
		log "unknown phase $ph (FLEET_PHASES: idle, submit)"
		exit 2
		;;
	esac
done
pool_stop

printf '\nfleet: %s; %s miners over %s passthroughs (%s), %s direct; %s shares/s; %s s window; ramp %s s; io %s, %s connector threads in the pool, %s per passthrough\n\n' \
	"$(machine)" "$MINERS" "$NP" "${PT_N[*]}" "$DIRECT" "$RATE" "$SECS" "$RAMP" "$IO" "$THREADS" "$PT_THREADS"
report_status=0
python3 - "$DIR" "$NP" "$MINERS" "$DIRECT" "$PHASES" <<'PY' || report_status=$?
import json, math, os, struct, sys

d, np_, miners, direct, phases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split()
load = lambda p: json.load(open(os.path.join(d, p))) if os.path.exists(os.path.join(d, p)) else None
pts = [f"pt{i}" for i in range(np_)]
bad = []

# hdrhistogram V2 (uncompressed, as ckload writes it): decode the counts and merge exactly.
def hist(hexs):
    b = bytes.fromhex(hexs) if hexs else b""
    if len(b) < 40:
        return None
    cookie, length, _off, digits = struct.unpack(">iiii", b[:16])
    lowest, _highest = struct.unpack(">qq", b[16:32])
    counts, i, idx, p = {}, 0, 0, b[40:40 + length]
    while i < len(p):
        v, shift = 0, 0
        while True:
            c = p[i]
            i += 1
            if shift == 56:
                v |= c << 56
                break
            v |= (c & 0x7F) << shift
            shift += 7
            if not c & 0x80:
                break
        v = (v >> 1) ^ -(v & 1)
        if v < 0:
            idx += -v
        else:
            if v:
                counts[idx] = counts.get(idx, 0) + v
            idx += 1
    return {"digits": digits, "lowest": lowest, "counts": counts}

def merge(hs):
    hs = [h for h in hs if h]
    if not hs:
        return None
    out = {"digits": hs[0]["digits"], "lowest": hs[0]["lowest"], "counts": {}}
    for h in hs:
        assert (h["digits"], h["lowest"]) == (out["digits"], out["lowest"])
        for k, v in h["counts"].items():
            out["counts"][k] = out["counts"].get(k, 0) + v
    return out

def quantile_us(h, q):
    if not h or not h["counts"]:
        return 0
    largest = 2 * 10 ** h["digits"]
    sbcm = max(1, math.ceil(math.log2(largest)))
    half_mag = sbcm - 1
    half = 1 << half_mag
    unit = int(math.floor(math.log2(max(1, h["lowest"]))))
    total = sum(h["counts"].values())
    want = max(1, math.ceil(q * total))
    seen = 0
    for idx in sorted(h["counts"]):
        seen += h["counts"][idx]
        if seen >= want:
            bucket = (idx >> half_mag) - 1
            sub = (idx & (half - 1)) + half
            if bucket < 0:
                sub -= half
                bucket = 0
            value = sub << (bucket + unit)
            # the highest value equivalent to it, as hdrhistogram reports
            size_bucket = bucket + 1 if sub >= (1 << sbcm) else bucket
            return value + (1 << (unit + size_bucket)) - 1
    return 0

def errors(r):
    c = r["counters"]
    return (c["connect_failures"] + c["subscribe_failures"] + c["authorize_failures"] + c["handshake_timeouts"]
            + c["disconnects"] + c["protocol_errors"] + c["unanswered"] + len(r["worker_failures"])
            + c["rejected"] + r["unexpected_replies"])

def pt_errors(s):
    return sum(s.get(k, 0) for k in ("dropped_slow_upstream", "rejected_down", "replay_closed"))

out = {"miners": miners, "direct": direct, "passthroughs": np_, "phases": {}}
rows = []
for ph in phases:
    counts = open(os.path.join(d, f"{ph}-counts.txt")).read().strip() if os.path.exists(os.path.join(d, f"{ph}-counts.txt")) else "not run"
    if not counts.startswith("ok"):
        bad.append(f"{ph}: miners missing at the count check: {counts}")
    reps = {"direct": load(f"{ph}-direct.json"), **{p: load(f"{ph}-{p}.json") for p in pts}}
    after = load(f"{ph}-after-stats.json") or {}
    for role, r in reps.items():
        if r is None:
            bad.append(f"{ph}: no ckload report for {role}")
            continue
        e = errors(r)
        if e:
            bad.append(f"{ph}: {role}: {e} ckload errors/rejects {r['errors']} {r['rejected_by_reason']}")
        if r["counters"]["authorized"] < r["miners"]:
            bad.append(f"{ph}: {role}: only {r['counters']['authorized']} of {r['miners']} miners authorised")
    for p in pts:
        e = pt_errors(after.get(p, {}))
        if e:
            bad.append(f"{ph}: {p}: {e} miners dropped or lines refused by the passthrough")
    out["phases"][ph] = {"counts": counts}

# idle: CPU over the idle window from /proc
if "idle" in phases and os.path.exists(os.path.join(d, "idle-cpu-1.json")):
    a, b = load("idle-cpu-0.json"), load("idle-cpu-1.json")
    secs = b["t"] - a["t"]
    idle = {}
    for role in b:
        if role == "t":
            continue
        idle[role] = {"cpu_pct": 100 * (b[role]["cpu_secs"] - a[role]["cpu_secs"]) / secs, "rss_kib": b[role]["rss_kib"]}
    fleet_pct = sum(v["cpu_pct"] for k, v in idle.items() if k == "pool" or k.startswith("pt"))
    per10k = fleet_pct / ((miners + direct) / 10000)
    out["phases"]["idle"].update({"window_secs": secs, "processes": idle, "fleet_cpu_pct": fleet_pct,
                                  "fleet_cpu_pct_per_10k_miners": per10k})

sub = {}
if "submit" in phases:
    reps = {"direct": load("submit-direct.json"), **{p: load(f"submit-{p}.json") for p in pts}}
    if all(reps.values()):
        total_acc = sum(r["counters"]["hold_accepted"] for r in reps.values())
        pool = reps["direct"]["pool"]
        sub["pool"] = {"miners": miners + direct, "rss_kib": pool["rss_kib_end"], "cpu_secs": pool["cpu_secs"],
                       "accepted": total_acc, "us_per_share": 1e6 * pool["cpu_secs"] / max(1, total_acc)}
        for p in pts:
            r = reps[p]
            acc = r["counters"]["hold_accepted"]
            sub[p] = {"miners": r["miners"], "rss_kib": r["pool"]["rss_kib_end"], "cpu_secs": r["pool"]["cpu_secs"],
                      "accepted": acc, "us_per_share": 1e6 * r["pool"]["cpu_secs"] / max(1, acc)}
        for role, r in reps.items():
            sub[f"ckload-{role}"] = {"miners": r["miners"], "rss_kib": r["ckload"]["max_worker_rss_kib"],
                                     "cpu_secs": r["ckload"]["cpu_secs_window"], "accepted": r["counters"]["hold_accepted"],
                                     "us_per_share": 1e6 * r["ckload"]["cpu_secs_window"] / max(1, r["counters"]["hold_accepted"])}
        hop = merge([hist(reps[p]["histograms_v2"].get("submit_window", "")) for p in pts])
        dirh = hist(reps["direct"]["histograms_v2"].get("submit_window", ""))
        hop99, dir99 = quantile_us(hop, 0.99), quantile_us(dirh, 0.99)
        hop50, dir50 = quantile_us(hop, 0.5), quantile_us(dirh, 0.5)
        # The same submits to their reply's arrival in the miner's socket (kernel stamp):
        # without the time a reply waited for its ckload worker, busy reading the lines of the
        # worker's other miners (a job's fan-out: 7,000 miners a worker behind a passthrough,
        # 1,000 in the direct group).
        hops = merge([hist(reps[p]["histograms_v2"].get("submit_socket", "")) for p in pts])
        dirs = hist(reps["direct"]["histograms_v2"].get("submit_socket", ""))
        hops99, dirs99 = quantile_us(hops, 0.99), quantile_us(dirs, 0.99)
        pt_us = sorted(sub[p]["us_per_share"] for p in pts)
        med_pt = pt_us[len(pt_us) // 2] if len(pt_us) % 2 else (pt_us[len(pt_us) // 2 - 1] + pt_us[len(pt_us) // 2]) / 2
        rate = sum(r["rates"]["accepted_per_sec"] for r in reps.values())
        out["phases"]["submit"].update({
            "window_secs": reps["direct"]["rates"]["window_secs"], "processes": sub,
            "accepted_per_sec": rate, "accepted_per_sec_hop": sum(reps[p]["rates"]["accepted_per_sec"] for p in pts),
            "submit_p99_us_hop": hop99, "submit_p99_us_direct": dir99, "submit_p50_us_hop": hop50, "submit_p50_us_direct": dir50,
            "p99_ratio": hop99 / max(1, dir99), "pt_us_per_share_median": med_pt,
            "socket_p99_us_hop": hops99, "socket_p99_us_direct": dirs99, "socket_p99_ratio": hops99 / max(1, dirs99),
            "pt_to_pool_cpu_ratio": med_pt / max(1e-9, sub["pool"]["us_per_share"]),
            "steal_pct": max(r["machine"]["steal_pct_window"] for r in reps.values()),
            "busy_pct": max(r["machine"]["busy_pct_window"] for r in reps.values())})
        # Context switches per share: over the window from the count check to ckload's end
        # (about FLEET_SECONDS), per share at each process's accepted rate.
        c0, c1 = load("submit-ctxt-0.json"), load("submit-ctxt-1.json")
        if c0 and c1 and c1["t"] > c0["t"]:
            dt = c1["t"] - c0["t"]
            for p in ["pool"] + pts:
                r = rate if p == "pool" else reps[p]["rates"]["accepted_per_sec"]
                sub[p]["ctxt_per_share"] = (c1[p] - c0[p]) / dt / max(1e-9, r)

ip = out["phases"].get("idle", {}).get("processes", {})
# The servers' CPU less their idle cost over the window (from the idle phase): at a low rate a
# process's fixed costs (timers, job broadcasts) are a large part of its CPU per share.
roles_of = {"pool": "pool", **{p: p for p in pts}, "ckload-direct": "ckload0", **{f"ckload-{p}": f"ckload{i + 1}" for i, p in enumerate(pts)}}
for key, v in sub.items():
    if key.startswith("ckload"):
        continue
    base = ip.get(roles_of.get(key, ""), {}).get("cpu_pct")
    if base is not None and "window_secs" in out["phases"].get("submit", {}):
        extra = v["cpu_secs"] - base / 100 * out["phases"]["submit"]["window_secs"]
        v["us_per_share_above_idle"] = 1e6 * extra / max(1, v["accepted"])
roles = ["pool"] + pts + ["ckload0"] + [f"ckload{i + 1}" for i in range(np_)]
names = {"ckload0": "ckload-direct", **{f"ckload{i + 1}": f"ckload-pt{i}" for i in range(np_)}}
print("| process | role | miners | RSS idle (MiB) | CPU idle (% of a core) | RSS submitting (MiB) | CPU submitting (s) | accepted shares | CPU µs per share | above idle |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
tsv = ["process\trole\tminers\trss_idle_kib\tcpu_idle_pct\trss_submit_kib\tcpu_submit_secs\taccepted\tus_per_share\tus_per_share_above_idle"]
for role in roles:
    key = names.get(role, role)
    i_ = ip.get(role, {})
    s_ = sub.get(key, {})
    what = "pool" if role == "pool" else ("passthrough" if role.startswith("pt") else "load generator")
    m = s_.get("miners", miners + direct if role == "pool" else "")
    f = lambda v, fmt: "-" if v is None or v == "" else fmt % v
    mib = lambda kib: "-" if kib is None or kib == "" else "%.1f" % (kib / 1024)
    print(f"| {key} | {what} | {m} | {mib(i_.get('rss_kib'))} | {f(i_.get('cpu_pct'), '%.2f')} | "
          f"{mib(s_.get('rss_kib'))} | {f(s_.get('cpu_secs'), '%.2f')} | {s_.get('accepted', '-')} | "
          f"{f(s_.get('us_per_share'), '%.2f')} | {f(s_.get('us_per_share_above_idle'), '%.2f')} |")
    tsv.append("\t".join(str(x) for x in (key, what, m, i_.get("rss_kib", ""), i_.get("cpu_pct", ""), s_.get("rss_kib", ""),
                                          s_.get("cpu_secs", ""), s_.get("accepted", ""), s_.get("us_per_share", ""),
                                          s_.get("us_per_share_above_idle", ""))))
# Totals: the servers (pool + passthroughs) and the load generators, CPU per share over every
# share accepted in the window.
for label, keys in (("fleet (pool + passthroughs)", ["pool"] + pts), ("ckload (all)", ["ckload0"] + [f"ckload{i + 1}" for i in range(np_)])):
    ik = [ip[k] for k in keys if k in ip]
    sk = [sub[names.get(k, k)] for k in keys if names.get(k, k) in sub]
    tot = {"rss_idle_kib": sum(v["rss_kib"] for v in ik) if ik else None, "cpu_idle_pct": sum(v["cpu_pct"] for v in ik) if ik else None,
           "rss_submit_kib": sum(v["rss_kib"] for v in sk) if sk else None, "cpu_submit_secs": sum(v["cpu_secs"] for v in sk) if sk else None}
    acc = sub["pool"]["accepted"] if "pool" in sub else None
    tot["us_per_share"] = 1e6 * tot["cpu_submit_secs"] / max(1, acc) if acc is not None and tot["cpu_submit_secs"] is not None else None
    out.setdefault("totals", {})[label] = tot
    print(f"| **{label}** | total | {miners + direct} | {mib(tot['rss_idle_kib'])} | {f(tot['cpu_idle_pct'], '%.2f')} | "
          f"{mib(tot['rss_submit_kib'])} | {f(tot['cpu_submit_secs'], '%.2f')} | {acc if acc is not None else '-'} | {f(tot['us_per_share'], '%.2f')} | - |")
print()
idl = out["phases"].get("idle", {})
if "fleet_cpu_pct" in idl:
    print(f"idle: fleet (pool + {np_} passthroughs) {idl['fleet_cpu_pct']:.2f} % of a core over {idl['window_secs']:.0f} s "
          f"with {miners + direct} miners: {idl['fleet_cpu_pct_per_10k_miners']:.3f} % per 10,000 miners (goal <= 1 %)")
s = out["phases"].get("submit", {})
if "p99_ratio" in s:
    print(f"submit: {s['accepted_per_sec']:.0f} shares/s accepted ({s['accepted_per_sec_hop']:.0f} through the passthroughs) "
          f"over {s['window_secs']:.0f} s; machine busy {s['busy_pct']:.0f} %, steal {s['steal_pct']:.1f} %")
    print(f"CPU per share: passthroughs {s['pt_us_per_share_median']:.2f} µs (median), pool {sub['pool']['us_per_share']:.2f} µs: "
          f"{s['pt_to_pool_cpu_ratio']:.2f}x (goal <= 0.5x)")
    print(f"submit p99 through the hop, to the reply's arrival in the miner's socket: hop {s['socket_p99_us_hop'] / 1000:.2f} ms, "
          f"direct {s['socket_p99_us_direct'] / 1000:.2f} ms: {s['socket_p99_ratio']:.2f}x (goal <= 1.5x)")
    print(f"  to when ckload read the reply (its own wait for the CPU too): hop {s['submit_p99_us_hop'] / 1000:.2f} ms, "
          f"direct {s['submit_p99_us_direct'] / 1000:.2f} ms: {s['p99_ratio']:.2f}x; "
          f"p50 {s['submit_p50_us_hop'] / 1000:.2f} / {s['submit_p50_us_direct'] / 1000:.2f} ms")
for ph in phases:
    print(f"{ph} counts: {out['phases'][ph]['counts']}")
out["errors"] = bad
if "submit" in out["phases"] and "ctxt_per_share" in out["phases"]["submit"].get("processes", {}).get("pool", {}):
    sp = out["phases"]["submit"]["processes"]
    print("context switches per share: " + ", ".join(f"{k} {v['ctxt_per_share']:.2f}" for k, v in sp.items() if "ctxt_per_share" in v))
print(f"errors: {len(bad)}" + "".join(f"\n  - {b}" for b in bad))
json.dump(out, open(os.path.join(d, "fleet.json"), "w"), indent=1)
open(os.path.join(d, "fleet.tsv"), "w").write("\n".join(tsv) + "\n")
print(f"\nwritten: {d}/fleet.json, {d}/fleet.tsv")
sys.exit(1 if bad else 0)
PY
exit "$report_status"
