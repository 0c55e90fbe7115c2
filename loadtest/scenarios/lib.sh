#!/usr/bin/env bash
# Shared by the benchmark scenarios in this directory (sourced, not run): builds the release
# binaries, starts the regtest node pair and ckpool-rs on them, runs ckload against it with
# --pool-pid and --json, and cleans everything up on exit.
#
# Environment (defaults in brackets):
#   BENCH_PORT [3334]      stratum port of the pool under test (loopback)
#   BENCH_THREADS [nproc]  pool connector threads (one per core)
#   BENCH_DIR [<repo>/.regtest/bench/<scenario>]  config, logs and JSON reports
#   BENCH_IO [epoll]       the pool's I/O backend (--io): the committed pool runs on epoll
#   BENCH_NO_BUILD         set to skip `cargo build --release`
#   BENCH_CKLOAD_NICE      run ckload at this nice value (e.g. 10), so that on a shared machine
#                          the server under test is not queued behind the load generator
#   BENCH_SERVER_CPUS, BENCH_CKLOAD_CPUS  CPU lists (taskset -c) for the server and for ckload,
#                          e.g. 0 and 1: the server on one core, the load generator on the other
#   BENCH_POOL_BIN, BENCH_CKPMSG_BIN, BENCH_CKLOAD_BIN  other ckpool-rs/ckpmsg/ckload binaries
#                          (e.g. another build)
#   BENCH_DIFF [2^-32]     the pool's mindiff = startdiff = maxdiff
#   BENCH_UPDATE_INTERVAL  the pool's `update_interval` (seconds between jobs) [60]
#   BENCH_EXTRA_CONF       more lines for the pool's config (each ending in a comma), e.g.
#                          '"passthroughserver" : [ "127.0.0.1:3641" ],'
# A scenario may define scenario_cleanup, which bench_cleanup calls first (its own processes).
set -euo pipefail

# Command prefixes: the CPUs the server and ckload may run on, and ckload's nice value.
SERVER_PREFIX=()
[[ -z ${BENCH_SERVER_CPUS:-} ]] || SERVER_PREFIX=(taskset -c "$BENCH_SERVER_CPUS")
CKLOAD_PREFIX=()
[[ -z ${BENCH_CKLOAD_CPUS:-} ]] || CKLOAD_PREFIX+=(taskset -c "$BENCH_CKLOAD_CPUS")
[[ -z ${BENCH_CKLOAD_NICE:-} ]] || CKLOAD_PREFIX+=(nice -n "$BENCH_CKLOAD_NICE")

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SCENARIO=${SCENARIO:?set SCENARIO before sourcing lib.sh}
PORT=${BENCH_PORT:-3334}
THREADS=${BENCH_THREADS:-$(nproc)}
IO=${BENCH_IO:-epoll}
DIR=${BENCH_DIR:-$ROOT/.regtest/bench/$SCENARIO}
POOL=${BENCH_POOL_BIN:-$ROOT/target/release/ckpool-rs}
CKPMSG=${BENCH_CKPMSG_BIN:-$ROOT/target/release/ckpmsg}
CKLOAD=${BENCH_CKLOAD_BIN:-$ROOT/target/release/ckload}
# 2^-32, the lowest difficulty: every hash is a share (DESIGN.md, "Load-testing trick").
MINDIFF=0.00000000023283064365386963
POOL_DIFF=${BENCH_DIFF:-$MINDIFF}

pool_pid=""
ckload_pid=""
LOAD_BEFORE=""
nodes_started=""

log() { printf '== %s\n' "$*" >&2; }

# bench_cleanup [STATUS]: the exit trap; STATUS (the signal's, for INT and TERM) or the script's.
bench_cleanup() {
	local status=$?
	[[ -z ${1:-} ]] || status=$1
	trap - EXIT INT TERM
	if declare -F scenario_cleanup >/dev/null; then
		scenario_cleanup || true
	fi
	if [[ -n $ckload_pid ]] && kill -0 "$ckload_pid" 2>/dev/null; then
		kill "$ckload_pid" 2>/dev/null || true
		wait "$ckload_pid" 2>/dev/null || true
	fi
	pool_stop
	if [[ -n $nodes_started ]]; then
		bash "$ROOT/scripts/regtest-node.sh" stop || true
	fi
	log "logs and reports are in $DIR"
	exit "$status"
}

# pool_stop: asks the server under test to shut down (ckpmsg, then a signal), waits up to 10 s,
# then kills it.
pool_stop() {
	if [[ -n $pool_pid ]] && kill -0 "$pool_pid" 2>/dev/null; then
		"$CKPMSG" -s "$DIR/sock" shutdown >/dev/null 2>&1 || kill "$pool_pid" 2>/dev/null || true
		for _ in $(seq 1 100); do
			kill -0 "$pool_pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pool_pid" 2>/dev/null || true
		wait "$pool_pid" 2>/dev/null || true
	fi
	pool_pid=""
}

# bench_setup: build, start the nodes and the pool; sets pool_pid, RPC_URL, RPC_USER, RPC_PASS.
bench_setup() {
	LOAD_BEFORE=$(cut -d ' ' -f 1-3 /proc/loadavg)
	trap bench_cleanup EXIT
	trap 'bench_cleanup 130' INT
	trap 'bench_cleanup 143' TERM
	mkdir -p "$DIR"
	cd "$ROOT"
	if [[ -z ${BENCH_NO_BUILD:-} ]]; then
		log "building ckpool-rs, ckpmsg and ckload (release)"
		cargo build --release --locked -p ckpool-rs --bin ckpool-rs --bin ckpmsg >&2
		cargo build --release --locked -p ckload --bin ckload >&2
	fi
	log "starting two peered regtest nodes"
	local settings
	nodes_started=1
	settings=$(bash scripts/regtest-node.sh start)
	get() { printf '%s\n' "$settings" | sed -n "s/^$1=//p"; }
	RPC_URL=$(get rpc_url)
	RPC_USER=$(get rpc_user)
	RPC_PASS=$(get rpc_pass)
	local zmq address
	zmq=$(get zmq)
	address=$(get address)
	cat >"$DIR/ckpool.conf" <<CONF
{
"btcd" : [ { "url" : "${RPC_URL#http://}", "auth" : "$RPC_USER", "pass" : "$RPC_PASS" } ],
"btcaddress" : "$address",
"btcsig" : "/ckpool-rs bench/",
"serverurl" : [ "127.0.0.1:$PORT" ],
${BENCH_EXTRA_CONF:-}
"mindiff" : $POOL_DIFF,
"startdiff" : $POOL_DIFF,
"maxdiff" : $POOL_DIFF,
"zmqblock" : "$zmq",
"blockpoll" : 500,
"update_interval" : ${BENCH_UPDATE_INTERVAL:-60},
"maxlinelength" : 4096,
"threads" : $THREADS,
"logdir" : "$DIR/logs"
}
Benchmark config: difficulty pinned (2^-32 unless BENCH_DIFF says otherwise) so every share ckload grinds is cheap and not a block.
CONF
	pool_start --io "$IO"
}

# pool_start ARGS...: starts ckpool-rs on the config bench_setup wrote, with extra ARGS; sets
# pool_pid once it answers ping.
pool_start() {
	log "starting ckpool-rs on 127.0.0.1:$PORT ($*)"
	"${SERVER_PREFIX[@]}" "$POOL" -c "$DIR/ckpool.conf" -s "$DIR/sock" -n "bench-$SCENARIO" -k -q "$@" \
		>"$DIR/pool.log" 2>&1 &
	pool_pid=$!
	for _ in $(seq 1 200); do
		if "$CKPMSG" -s "$DIR/sock" ping 2>/dev/null | grep -q pong; then
			return 0
		fi
		if ! kill -0 "$pool_pid" 2>/dev/null; then
			cat "$DIR/pool.log" >&2
			log "ckpool-rs exited during start-up"
			exit 1
		fi
		sleep 0.1
	done
	log "ckpool-rs did not answer ping"
	exit 1
}

# ckload_run NAME ARGS...: runs ckload with --pool-pid and --json $DIR/NAME.json (bounded by
# its own --duration); the human summary goes to $DIR/NAME.txt and stderr.
ckload_run() {
	local name=$1
	shift
	log "ckload $*"
	"${CKLOAD_PREFIX[@]}" "$CKLOAD" "$@" --url "127.0.0.1:$PORT" --pool-pid "$pool_pid" --json "$DIR/$name.json" \
		>"$DIR/$name.txt" &
	ckload_pid=$!
	local status=0
	wait "$ckload_pid" || status=$?
	ckload_pid=""
	cat "$DIR/$name.txt" >&2
	return "$status"
}

# jget FILE EXPR: a value from a ckload JSON report (EXPR is a Python expression over `r`).
jget() {
	python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

# machine: one line describing this machine and commit, for the tables.
machine() {
	local cpu
	cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
	printf '%s, %s CPUs, %s GiB, Linux %s, commit %s, load average before the run %s\n' \
		"$cpu" "$(nproc)" "$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)" \
		"$(uname -r)" "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
		"$LOAD_BEFORE"
}
