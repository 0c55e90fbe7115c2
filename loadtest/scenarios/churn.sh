#!/usr/bin/env bash
# Scenario "churn" (not in BENCHMARKS.md's four): CHURN_MINERS miners, CHURN_FRACTION of them
# disconnect and reconnect per second with session resume; reports resumes and latencies.
#
# Environment: CHURN_MINERS [5000], CHURN_FRACTION [0.02], CHURN_SECONDS [60], CHURN_RATE [1000];
# and those of lib.sh.
set -euo pipefail
SCENARIO=churn
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MINERS=${CHURN_MINERS:-5000}
FRACTION=${CHURN_FRACTION:-0.02}
SECS=${CHURN_SECONDS:-60}
RATE=${CHURN_RATE:-1000}

bench_setup
ckload_run churn churn --miners "$MINERS" --workers 2 --churn "$FRACTION" --rate "$RATE" \
	--ramp 5 --duration "$((5 + SECS))" --quiet
J=$DIR/churn.json
printf '\nchurn: %s\n' "$(machine)"
printf '| miners | churn/s | resumes | same extranonce1 | different | login p99 | submit p99 | errors |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
printf '| %s | %s | %s | %s | %s | %s ms | %s ms | %s |\n' "$MINERS" "$FRACTION" \
	"$(jget "$J" 'r["counters"]["resume_attempts"]')" "$(jget "$J" 'r["counters"]["resume_ok"]')" \
	"$(jget "$J" 'r["counters"]["resume_mismatch"]')" \
	"$(jget "$J" 'round(r["latency"]["login"]["p99_us"]/1000, 2)')" \
	"$(jget "$J" 'round(r["latency"]["submit"]["p99_us"]/1000, 2)')" \
	"$(jget "$J" 'sum(r["errors"].values())')"
