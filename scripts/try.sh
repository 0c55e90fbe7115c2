#!/usr/bin/env bash
# Try ckpool-rs on a real regtest node: builds it, starts two peered regtest nodes, ckpool-rs in
# pool mode on them and the bundled CPU miner (ckload) against it, and shows blocks being found
# (height rising, the pool's log of shares and blocks) until Ctrl-C. Then it cleans up.
#
# Environment: TRY_PORT [3333] stratum port; TRY_RATE [2] miner submits per second (each job's
# block solution counts, so this is also about the block rate); TRY_SECONDS stops by itself after
# that many seconds (default: run until Ctrl-C); TRY_WEB [127.0.0.1:8080] the dashboard and metrics
# address (empty: off).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PORT=${TRY_PORT:-3333}
RATE=${TRY_RATE:-2}
WEB=${TRY_WEB-127.0.0.1:8080}
DIR=$ROOT/.regtest/try
mkdir -p "$DIR"

echo "== building ckpool-rs and ckload (release)"
cargo build --release --locked --bin ckpool-rs --bin ckpmsg && cargo build --release --locked -p ckload --bin ckload

echo "== starting two peered regtest nodes"
settings=$(bash scripts/regtest-node.sh start)
get() { printf '%s\n' "$settings" | sed -n "s/^$1=//p"; }
rpc_url=$(get rpc_url)
rpc_user=$(get rpc_user)
rpc_pass=$(get rpc_pass)
zmq=$(get zmq)
address=$(get address)
CLI=$(dirname "$(bash scripts/regtest-node.sh path)")/bitcoin-cli
height() { "$CLI" -regtest -rpcconnect=127.0.0.1 -rpcport="${rpc_url##*:}" -rpcuser="$rpc_user" -rpcpassword="$rpc_pass" getblockcount; }

pool_pid=""
miner_pid=""
tail_pid=""
cleanup() {
	trap - EXIT INT TERM
	echo
	echo "== cleaning up"
	if [[ -n $tail_pid ]]; then kill "$tail_pid" 2>/dev/null || true; fi
	if [[ -n $miner_pid ]]; then kill "$miner_pid" 2>/dev/null || true; fi
	if [[ -n $pool_pid ]]; then
		target/release/ckpmsg -s "$DIR/sock" shutdown >/dev/null 2>&1 || kill "$pool_pid" 2>/dev/null || true
		wait "$pool_pid" 2>/dev/null || true
	fi
	bash scripts/regtest-node.sh stop || true
	echo "logs are in $DIR"
}
trap cleanup EXIT INT TERM

web_key=""
if [[ -n $WEB ]]; then
	web_key=$(printf ',\n"webserver" : "%s"' "$WEB")
fi
cat >"$DIR/ckpool.conf" <<CONF
{
"btcd" : [ { "url" : "${rpc_url#http://}", "auth" : "$rpc_user", "pass" : "$rpc_pass" } ],
"btcaddress" : "$address",
"btcsig" : "/ckpool-rs try/",
"serverurl" : [ "127.0.0.1:$PORT" ],
"mindiff" : 0.00000000023283064365386963,
"startdiff" : 0.00000000023283064365386963,
"zmqblock" : "$zmq",
"logdir" : "$DIR/logs"$web_key
}
Regtest: half of all hashes solve a block, so the lowest difficulty (2^-32) makes every hash a share.
CONF

echo "== starting ckpool-rs (pool mode, paying $address)"
target/release/ckpool-rs -c "$DIR/ckpool.conf" -s "$DIR/sock" -n try -k -L >"$DIR/pool.log" 2>&1 &
pool_pid=$!
for _ in $(seq 1 100); do
	if target/release/ckpmsg -s "$DIR/sock" ping 2>/dev/null | grep -q pong; then break; fi
	if ! kill -0 "$pool_pid" 2>/dev/null; then
		cat "$DIR/pool.log"
		echo "ckpool-rs exited" >&2
		exit 1
	fi
	sleep 0.1
done

echo "== starting the CPU miner (ckload) on 127.0.0.1:$PORT"
target/release/ckload mine --url "127.0.0.1:$PORT" --user "$address.try" --rate "$RATE" >"$DIR/miner.log" 2>&1 &
miner_pid=$!

start_height=$(height)
if [[ -n $WEB ]]; then
	echo "== dashboard: http://$WEB/  metrics: http://$WEB/metrics  API: http://$WEB/api/pool"
fi
echo "== mining from height $start_height; Ctrl-C to stop"
# The pool's own log of solved blocks and its periodic share counts.
tail -n 0 -F "$DIR/pool.log" 2>/dev/null | grep --line-buffered -E "BLOCK|status" &
tail_pid=$!
started=$SECONDS
while true; do
	sleep 5
	h=$(height)
	stats=$(target/release/ckpmsg -s "$DIR/sock" stats 2>/dev/null || echo '{}')
	accepted=$(printf '%s' "$stats" | sed -n 's/.*"accepted":\([0-9]*\).*/\1/p')
	rejected=$(printf '%s' "$stats" | sed -n 's/.*"rejected":\([0-9]*\).*/\1/p')
	echo "-- height $h (+$((h - start_height))), pool shares accepted ${accepted:-?} rejected ${rejected:-?}"
	if [[ -n ${TRY_SECONDS:-} ]] && ((SECONDS - started >= TRY_SECONDS)); then
		break
	fi
	if ! kill -0 "$pool_pid" 2>/dev/null; then
		echo "ckpool-rs exited; see $DIR/pool.log" >&2
		exit 1
	fi
done
