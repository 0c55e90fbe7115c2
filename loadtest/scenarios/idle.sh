#!/usr/bin/env bash
# Scenario "idle": 15,000 connected, authorized miners that submit nothing, held for 2 minutes
# on one pool process. Reports the pool's RSS, RSS per miner and CPU.
#
# Environment: IDLE_MINERS [15000], IDLE_SECONDS [120] (held after the ramp), IDLE_RAMP [15],
# IDLE_WORKERS [2]; and those of lib.sh.
set -euo pipefail
SCENARIO=idle
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MINERS=${IDLE_MINERS:-15000}
HOLD=${IDLE_SECONDS:-120}
RAMP=${IDLE_RAMP:-15}
WORKERS=${IDLE_WORKERS:-2}

bench_setup
ckload_run idle steady --miners "$MINERS" --workers "$WORKERS" --rate 0 --ramp "$RAMP" \
	--duration "$((RAMP + HOLD))" --quiet
J=$DIR/idle.json
printf '\nidle: %s\n' "$(machine)"
printf '| miners authorized | held | pool RSS before | pool RSS with miners | RSS per miner | pool CPU (avg) | ckload CPU (avg) | errors |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- |\n'
printf '| %s | %s s | %s MiB | %s MiB | %s B | %s%% of one core | %s%% of one core | %s |\n' \
	"$(jget "$J" 'r["peak_authorized"]')" "$HOLD" \
	"$(jget "$J" 'round(r["pool"]["rss_kib_start"]/1024, 1)')" \
	"$(jget "$J" 'round(r["pool"]["rss_kib_end"]/1024, 1)')" \
	"$(jget "$J" 'round(r["pool"]["rss_bytes_per_miner"])')" \
	"$(jget "$J" 'round(r["pool"]["cpu_pct"], 2)')" \
	"$(jget "$J" 'round(r["ckload"]["cpu_pct_window"], 2)')" \
	"$(jget "$J" 'r["counters"]["connect_failures"] + r["counters"]["disconnects"] + r["counters"]["handshake_timeouts"]')"
