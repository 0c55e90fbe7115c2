#!/usr/bin/env bash
# Scenario "storm": 15,000 miners connect, subscribe and authorize within 10 s. Failures must be
# 0; reports connect, subscribe, authorize and whole-login latencies.
#
# Environment: STORM_MINERS [15000], STORM_WITHIN [10], STORM_WORKERS [2]; and those of lib.sh.
set -euo pipefail
SCENARIO=storm
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MINERS=${STORM_MINERS:-15000}
WITHIN=${STORM_WITHIN:-10}
WORKERS=${STORM_WORKERS:-2}

bench_setup
ckload_run storm storm --miners "$MINERS" --workers "$WORKERS" --within "$WITHIN" \
	--duration "$((WITHIN + 5))" --quiet
J=$DIR/storm.json
ms() { jget "$J" "round(r['latency']['$1']['$2']/1000, 2)"; }
failures=$(jget "$J" 'r["counters"]["connect_failures"] + r["counters"]["subscribe_failures"] + r["counters"]["authorize_failures"] + r["counters"]["handshake_timeouts"] + r["counters"]["disconnects"] + sum(r["errors"].values())')
printf '\nstorm: %s\n' "$(machine)"
printf '| miners | window | authorized | failures | connect p50 / p99 | subscribe p99 | authorize p99 | connect+subscribe+authorize p50 / p99 / max | pool CPU, whole run |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
printf '| %s | %s s | %s | %s | %s / %s ms | %s ms | %s ms | %s / %s / %s ms | %s s |\n' \
	"$MINERS" "$WITHIN" "$(jget "$J" 'r["counters"]["authorized"]')" "$failures" \
	"$(ms connect p50_us)" "$(ms connect p99_us)" "$(ms subscribe p99_us)" "$(ms authorize p99_us)" \
	"$(ms login p50_us)" "$(ms login p99_us)" "$(ms login max_us)" \
	"$(jget "$J" 'round(r["pool"]["cpu_secs_run"], 2)')"
if [[ $failures != 0 ]]; then
	log "storm: $failures failures (must be 0)"
	exit 1
fi
