#!/usr/bin/env bash
# Scenario "handover": a `-H` upgrade under load. ckload holds HO_MINERS miners submitting at a
# moderate rate; once every one is authorised and HO_BEFORE seconds of load have passed, a new
# instance of the same binary is started with -H and takes the pool over; the load goes on for
# HO_AFTER seconds, then every miner checks that its session id still resumes its session
# (ckload --resume-at-end). Repeated HO_RUNS times, each on a freshly started pool. Prints, per
# run: disconnects, rejects by reason, submits sent / answered / unanswered, replies to no
# request (a second reply to a submit) and Duplicate rejects, the session checks, the longest
# stretch with no accepted share pool-wide (ckload's 10-ms timeline) and the longest dip below
# half the median rate (100-ms buckets), the accepted shares per second around the upgrade, and
# the load average; then the medians.
#
# More miners than one process's open-files limit (20,000 here): ckload splits them over worker
# processes (one per 10,000 miners, each on its own 127.0.0.x source address); the pool holds
# them on io_uring in direct descriptors (two connector threads, up to the soft limit each), and
# the handover moves them in batches no bigger than the new instance's free descriptors.
#
# Environment (defaults in brackets): HO_MINERS [10000], HO_RUNS [3], HO_RATE [miners / 10:
# 0.1 share/s per miner], HO_RAMP [miners / 1500 + 5 s], HO_BEFORE [10 s], HO_AFTER [20 s],
# HO_WORKERS [one per 10,000 miners, at least 2]; BENCH_IO [$POOL_BACKEND, else uring]; the
# regtest nodes on their own ports (REGTEST_RPC_PORT1 [19743] and the others 1300 above the
# defaults of scripts/regtest-node.sh), the pool on BENCH_PORT [3617]; and those of lib.sh.
set -euo pipefail
SCENARIO=handover
: "${BENCH_IO:=${POOL_BACKEND:-uring}}"
: "${BENCH_PORT:=3617}"
export BENCH_IO BENCH_PORT
export REGTEST_RPC_PORT1=${REGTEST_RPC_PORT1:-19743} REGTEST_RPC_PORT2=${REGTEST_RPC_PORT2:-19753}
export REGTEST_P2P_PORT1=${REGTEST_P2P_PORT1:-19744} REGTEST_P2P_PORT2=${REGTEST_P2P_PORT2:-19754}
export REGTEST_ZMQ_PORT=${REGTEST_ZMQ_PORT:-29732}
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MINERS=${HO_MINERS:-10000}
RUNS=${HO_RUNS:-3}
RATE=${HO_RATE:-$((MINERS / 10))}
RAMP=${HO_RAMP:-$((MINERS / 1500 + 5))}
BEFORE=${HO_BEFORE:-10}
AFTER=${HO_AFTER:-20}
WORKERS=${HO_WORKERS:-$(((MINERS + 9999) / 10000))}
((WORKERS >= 2)) || WORKERS=2
# ckload starts its miners this long after it is started (its START_DELAY).
START_DELAY=1.5
DURATION=$((RAMP + BEFORE + AFTER))

# stat KEY: a value from the running pool's admin `stats`, or nothing.
stat() {
	"$CKPMSG" -s "$DIR/sock" stats 2>/dev/null |
		python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$1" 2>/dev/null || true
}
now() { date +%s.%N; }
later() { python3 -c 'import sys; print(float(sys.argv[1]) >= float(sys.argv[2]))' "$(now)" "$1"; }

bench_setup
rows=()
for run in $(seq 1 "$RUNS"); do
	if ((run > 1)); then
		pool_stop
		pool_start --io "$IO"
	fi
	J=$DIR/run$run.json
	log "run $run: ckload steady, $MINERS miners, $RATE shares/s, upgrade at $((RAMP + BEFORE)) s"
	"${CKLOAD_PREFIX[@]}" "$CKLOAD" steady --url "127.0.0.1:$PORT" --miners "$MINERS" \
		--workers "$WORKERS" --rate "$RATE" --ramp "$RAMP" --duration "$DURATION" --drain 5 \
		--resume-at-end --quiet --json "$J" >"$DIR/run$run.txt" &
	ckload_pid=$!
	t_load=$(now)
	upgrade_at=$(python3 -c "print($t_load + $START_DELAY + $RAMP + $BEFORE)")
	# Every miner authorised before the upgrade is due (the pool counts authorised clients).
	until [[ $(stat clients) == "$MINERS" ]]; do
		if [[ $(later "$upgrade_at") == True ]]; then
			log "run $run: only $(stat clients) of $MINERS miners connected by the upgrade; giving up"
			exit 1
		fi
		sleep 0.2
	done
	sleep "$(python3 -c "print(max(0.0, $upgrade_at - $(now)))")"
	load_at=$(cut -d ' ' -f 1-3 /proc/loadavg)
	old_pid=$pool_pid
	t_ho=$(now)
	"${SERVER_PREFIX[@]}" "$POOL" -c "$DIR/ckpool.conf" -s "$DIR/sock" -n "bench-$SCENARIO" -q -H \
		--io "$IO" >"$DIR/pool-run$run-new.log" 2>&1 &
	pool_pid=$!
	old_status=0
	wait "$old_pid" || old_status=$?
	t_done=$(now)
	cat "$DIR/pool.log" >>"$DIR/pool-run$run-old.log"
	if ((old_status != 0)) || ! kill -0 "$pool_pid" 2>/dev/null; then
		log "run $run: the handover failed (old instance exit $old_status)"
		tail -n 20 "$DIR/pool-run$run-new.log" >&2
		exit 1
	fi
	load_status=0
	wait "$ckload_pid" || load_status=$?
	ckload_pid=""
	cat "$DIR/run$run.txt" >&2
	((load_status == 0)) || log "run $run: ckload exited $load_status"
	took=$(python3 -c "print(round(($t_done - $t_ho) * 1000))")
	at=$(python3 -c "print(round($t_ho - $t_load - $START_DELAY, 2))")
	moved=$(sed -n 's/.*took the running instance over connections=\([0-9]*\).*/\1/p' "$DIR/pool-run$run-new.log" | head -n 1)
	# The old instance's own count: from quiescing (no more reading) to the commit.
	paused=$(sed -n 's/.*handover committed.* ms=\([0-9]*\).*/\1/p' "$DIR/pool-run$run-old.log" | tail -n 1)
	rows+=("$(jget "$J" "'| $IO | $MINERS | $run | ' + str(r['counters']['disconnects']) + ' | ' + (str(r['counters']['rejected']) + ' ' + str(r['rejected_by_reason']) if r['counters']['rejected'] else '0') + ' | ' + str(r['counters']['submitted']) + ' / ' + str(r['counters']['accepted'] + r['counters']['rejected']) + ' / ' + str(r['counters']['submitted'] - r['counters']['accepted'] - r['counters']['rejected']) + ' | ' + str(r['counters']['unknown_replies']) + ' / ' + str(r['rejected_by_reason'].get('Duplicate', 0)) + ' | ' + str(r['counters']['subscribed'] - r['miners']) + ' / ' + str(r['counters']['end_resume_ok']) + ' of ' + str(r['counters']['end_resume_attempts']) + ' | ' + str(r['accepts']['longest_gap_ms']) + ' ms at ' + str(r['accepts']['longest_gap_at_secs']) + ' s | ' + str(r['accepts']['longest_dip_ms']) + ' ms | ' + str(round(r['latency']['submit_window']['max_us'] / 1000)) + ' ms | ' + ' '.join(str(n) for n in r['accepts']['per_second'][max(0, int($at) - 2):int($at) + 4]) + ' | $at s, $took ms, ${paused:-?} ms, ${moved:-?} | $load_at |'")")
	printf '%s\n' "${rows[-1]}" >&2
done

printf '\nhandover: %s; %s miners, %s shares/s in total, ramp %s s, upgrade %s s after it, load for %s s after\n' \
	"$(machine)" "$MINERS" "$RATE" "$RAMP" "$BEFORE" "$AFTER"
printf '| backend | miners | run | disconnects | rejects | submits sent / answered / not answered | replies to no request / Duplicate | re-subscribes / sessions resumed at the end | longest gap with no accepted share | longest dip below half the median rate | slowest reply | accepted per second around the upgrade | upgrade at (s into the run), -H start to old exit, old quiesced to commit, connections moved | load average |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
printf '%s\n' "${rows[@]}"
python3 - "$DIR" "$RUNS" <<'PY'
import json, statistics, sys
d, runs = sys.argv[1], int(sys.argv[2])
rs = [json.load(open(f"{d}/run{i}.json")) for i in range(1, runs + 1)]
gap = statistics.median(r["accepts"]["longest_gap_ms"] for r in rs)
dip = statistics.median(r["accepts"]["longest_dip_ms"] for r in rs)
slow = statistics.median(r["latency"]["submit_window"]["max_us"] / 1000 for r in rs)
print(f"\nmedian of {runs}: longest gap {gap:.0f} ms, longest dip {dip:.0f} ms, slowest reply {slow:.0f} ms; "
      f"disconnects {sum(r['counters']['disconnects'] for r in rs)}, "
      f"rejects {sum(r['counters']['rejected'] for r in rs)}, "
      f"unanswered {sum(r['counters']['unanswered'] for r in rs)} in all runs")
PY
