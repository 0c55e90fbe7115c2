#!/usr/bin/env bash
# Scenario "fanout": 15,000 connected miners; ckload forces 20 new blocks (`generate 1` over
# RPC, 3 s apart) and measures, per job, the time from the first to the last miner receiving its
# mining.notify, and from the generate call to the first and last receipt.
#
# Environment: FANOUT_MINERS [15000], FANOUT_BLOCKS [20], FANOUT_INTERVAL [3], FANOUT_RAMP [15],
# FANOUT_WORKERS [2]; and those of lib.sh.
set -euo pipefail
SCENARIO=fanout
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MINERS=${FANOUT_MINERS:-15000}
BLOCKS=${FANOUT_BLOCKS:-20}
INTERVAL=${FANOUT_INTERVAL:-3}
RAMP=${FANOUT_RAMP:-15}
WORKERS=${FANOUT_WORKERS:-2}

bench_setup
ckload_run fanout fanout --miners "$MINERS" --workers "$WORKERS" --ramp "$RAMP" \
	--blocks "$BLOCKS" --block-interval "$INTERVAL" \
	--rpc-url "$RPC_URL" --rpc-user "$RPC_USER" --rpc-pass "$RPC_PASS" --quiet
J=$DIR/fanout.json
ms() { jget "$J" "round(r['fanout']['$1']['$2']/1000, 1)"; }
printf '\nfanout: %s\n' "$(machine)"
printf '| miners | blocks forced | jobs measured | first->last notify p50 / p99 / max | generate->first notify p50 / p99 | generate->last notify p50 / p99 | pool CPU per block |\n'
printf '| --- | --- | --- | --- | --- | --- | --- |\n'
printf '| %s | %s | %s | %s / %s / %s ms | %s / %s ms | %s / %s ms | %s s |\n' \
	"$(jget "$J" 'r["peak_authorized"]')" \
	"$(jget "$J" 'sum(1 for b in r["fanout"]["blocks"] if b["hash"])')" \
	"$(jget "$J" 'r["fanout"]["jobs_measured"]')" \
	"$(ms spread p50_us)" "$(ms spread p99_us)" "$(ms spread max_us)" \
	"$(ms block_to_first p50_us)" "$(ms block_to_first p99_us)" \
	"$(ms block_to_last p50_us)" "$(ms block_to_last p99_us)" \
	"$(jget "$J" 'round(r["pool"]["cpu_secs"] / max(1, len(r["fanout"]["blocks"])), 3)')"
