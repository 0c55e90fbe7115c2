#!/usr/bin/env bash
# Scenario "sidebyside": the pool on each I/O backend (and hand-off) against the null-stratum floor,
# same machine, same ckload runs, interleaved so drift and host noise fall on every server alike.
#
# Servers (SBS_SERVERS, default "pool:uring:inline pool:epoll:inline null:uring null:epoll"):
#   pool:<io>:<handoff>  ckpool-rs with --io <io> --handoff <handoff> on the regtest node pair
#   null:<io>            connector/examples/nullstratum with --backend <io> (canned replies)
#   old:<io>:<handoff>   another ckpool-rs build (SBS_OLD_POOL_BIN, e.g. the previous commit's release
#                        binary) on the same node pair and config: old and new commit in one batch
# A fresh server process for every run (its log kept as NAME.pool.log or NAME.null.log). Four
# measurements, each a table:
#   1. cpu: SBS_REPS rounds; in each, every server once at SBS_RATE shares/s from SBS_MINERS
#      miners: server CPU µs per accepted share and submit p99 (median and all values).
#   2. max: the rates of SBS_MAX_RATES in turn. At each, every server still in the race runs up
#      to SBS_MAX_RUNS times (runs interleaved across servers, order rotated each round); a run
#      passes with submit p99 <= SBS_P99_MS, >= 98 % of the asked rate accepted, no reject and no
#      unanswered submit. The p99 is the window's (SBS_MAX_BY=window, the default) or the median
#      of the window's per-second p99s (SBS_MAX_BY=seconds: a few bad seconds, such as a stall of
#      the host, do not fail a step; a server at its limit is slow in most seconds). The VM's host steals the CPU in bursts of milliseconds, which only ever
#      adds latency: a failed run counts only if the host stole < SBS_MAX_STEAL % of the machine
#      meanwhile and never held one CPU for SBS_MAX_STEAL_BURST ms or more at a stretch (ckload
#      samples each CPU's steal every 10 ms; a 150 ms burst on the server's CPU delays ~0.75 %
#      of a run's submits by itself), otherwise it is run again. With SBS_MAX_VOTES=1 (the
#      default) a server passes the step with its first passing run and fails it with its first
#      counted failure; with SBS_MAX_VOTES=N (odd) the step is a majority vote of N runs: it
#      passes with (N+1)/2 passing runs and fails with (N+1)/2 counted failures, so that one run
#      spoilt by the host decides nothing. A server with neither after SBS_MAX_RUNS runs fails
#      the step (marked so), and it leaves the race at its first failed step.
#   3. fanout: SBS_MINERS idle miners; the pool gets SBS_BLOCKS forced blocks (`generate 1`),
#      the floor broadcasts a notify every SBS_BLOCK_INTERVAL s; first->last miner receipt per job.
#   4. idle: SBS_MINERS authorized idle miners for SBS_IDLE_SECONDS: server RSS per miner. With
#      SBS_IDLE_MINERS="A B" (two counts) the run is repeated at each, and the RSS slope between
#      them, (RSS(B) - RSS(A)) / (B - A), is reported too: the cost of one more connection, without
#      the fixed costs (io_uring's receive-buffer rings) that the first thousands of miners touch.
#
# Environment: SBS_SERVERS, SBS_MINERS [15000], SBS_RATE [20000], SBS_REPS [3], SBS_SECONDS [20]
# (measurement window), SBS_RAMP [5], SBS_MAX_RATES ["20000 25000 30000 35000 40000 45000 50000"],
# SBS_MAX_RUNS [5], SBS_MAX_VOTES [1], SBS_MAX_STEAL [2], SBS_MAX_STEAL_BURST [50], SBS_MAX_BY [window],
# SBS_P99_MS [5], SBS_BLOCKS [8], SBS_BLOCK_INTERVAL [2], SBS_IDLE_SECONDS [10], SBS_WORKERS [2],
# SBS_PHASES ["cpu max fanout idle"], SBS_NULL_PORT [23335]; and those of lib.sh (BENCH_PORT,
# BENCH_THREADS, BENCH_DIR, BENCH_NO_BUILD, BENCH_POOL_BIN), SBS_OLD_POOL_BIN for old:* servers.
set -euo pipefail
SCENARIO=sidebyside
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SERVERS=${SBS_SERVERS:-pool:uring:inline pool:epoll:inline null:uring null:epoll}
MINERS=${SBS_MINERS:-15000}
RATE=${SBS_RATE:-20000}
REPS=${SBS_REPS:-3}
SECS=${SBS_SECONDS:-20}
RAMP=${SBS_RAMP:-5}
MAX_RATES=${SBS_MAX_RATES:-20000 25000 30000 35000 40000 45000 50000}
P99_MS=${SBS_P99_MS:-5}
BLOCKS=${SBS_BLOCKS:-8}
BLOCK_INTERVAL=${SBS_BLOCK_INTERVAL:-2}
IDLE_SECS=${SBS_IDLE_SECONDS:-10}
IDLE_MINERS=${SBS_IDLE_MINERS:-$MINERS}
WORKERS=${SBS_WORKERS:-2}
PHASES=${SBS_PHASES:-cpu max fanout idle}
NULL_PORT=${SBS_NULL_PORT:-23335}
MAX_RUNS=${SBS_MAX_RUNS:-5}
MAX_STEAL=${SBS_MAX_STEAL:-2}
MAX_STEAL_BURST=${SBS_MAX_STEAL_BURST:-50}
MAX_BY=${SBS_MAX_BY:-window}
MAX_VOTES=${SBS_MAX_VOTES:-1}
if ! [[ $MAX_VOTES =~ ^[0-9]+$ ]] || ((MAX_VOTES % 2 == 0)); then
	echo "SBS_MAX_VOTES must be an odd number" >&2
	exit 2
fi
MAX_NEED=$(((MAX_VOTES + 1) / 2))
if ((MAX_RUNS < MAX_VOTES)); then
	MAX_RUNS=$MAX_VOTES
fi
case $MAX_BY in
window) P99_OF="r['latency']['submit_window']['p99_us']" ;;
seconds) P99_OF="r['submit_seconds']['median_p99_us']" ;;
*)
	echo "SBS_MAX_BY must be window or seconds" >&2
	exit 2
	;;
esac
NULL_BIN=$ROOT/target/release/examples/nullstratum
POOL_PORT=$PORT

if [[ -z ${BENCH_NO_BUILD:-} ]]; then
	log "building the null-stratum floor (release)"
	(cd "$ROOT" && cargo build --release --locked -p ckpool-connector --example nullstratum >&2)
fi
# Starts the node pair and writes the pool's config; the pool it starts is stopped at once, as
# every run below starts its own server.
bench_setup
pool_stop

# start_server SERVER [NOTIFY_EVERY]: starts it on its port; sets pool_pid (the server's pid) and
# PORT. The floor broadcasts a notify every NOTIFY_EVERY s (default 60, the pool's
# update_interval here); only the fan-out runs ask for more.
start_server() {
	local kind io handoff every=${2:-60}
	IFS=: read -r kind io handoff <<<"$1"
	if [[ $kind == null ]]; then
		PORT=$NULL_PORT
		"${SERVER_PREFIX[@]}" "$NULL_BIN" --listen "127.0.0.1:$PORT" --threads "$THREADS" --backend "$io" \
			--notify-every "$every" --duration 3600 >"$DIR/null.log" 2>&1 &
		pool_pid=$!
		for _ in $(seq 1 100); do
			if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
				return 0
			fi
			sleep 0.05
		done
		log "nullstratum did not start"
		exit 1
	fi
	PORT=$POOL_PORT
	if [[ $kind == old ]]; then
		if [[ -z ${SBS_OLD_POOL_BIN:-} || ! -x $SBS_OLD_POOL_BIN ]]; then
			log "old:* servers need SBS_OLD_POOL_BIN, an executable ckpool-rs"
			exit 2
		fi
		POOL=$SBS_OLD_POOL_BIN pool_start --io "$io" --handoff "${handoff:-inline}"
		return
	fi
	pool_start --io "$io" --handoff "${handoff:-inline}"
}

tag_of() { tr ':' '-' <<<"$1"; }

# steady_run SERVER NAME RATE: one ckload steady run against a fresh server.
steady_run() {
	start_server "$1"
	ckload_run "$2" steady --miners "$MINERS" --workers "$WORKERS" --rate "$3" \
		--ramp "$RAMP" --duration "$((RAMP + SECS))" --quiet || true
	pool_stop
	# Each run's server log next to its report: both servers log every loop round that kept a
	# connector thread busy for 20 ms or more, which tells their own stalls from the host's or
	# ckload's.
	if [[ $1 == pool:* || $1 == old:* ]] && [[ -f $DIR/pool.log ]]; then
		cp "$DIR/pool.log" "$DIR/$2.pool.log"
	elif [[ $1 == null:* && -f $DIR/null.log ]]; then
		cp "$DIR/null.log" "$DIR/$2.null.log"
	fi
}

declare -A CPU P99 STEAL
# median of the space-separated numbers in $1.
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

if [[ " $PHASES " == *" cpu "* ]]; then
	for rep in $(seq 1 "$REPS"); do
		for srv in $SERVERS; do
			name=cpu-$(tag_of "$srv")-$rep
			steady_run "$srv" "$name" "$RATE"
			J=$DIR/$name.json
			CPU[$srv]+="$(jget "$J" 'round(r["pool"]["cpu_secs_per_million_shares"] or 0, 2)') "
			P99[$srv]+="$(jget "$J" 'round(r["latency"]["submit_window"]["p99_us"]/1000, 2)') "
			STEAL[$srv]+="$(jget "$J" 'round(r["machine"]["steal_pct_window"], 1)') "
		done
	done
fi

declare -A BEST STEPS
if [[ " $PHASES " == *" max "* ]]; then
	racing=$SERVERS
	for rate in $MAX_RATES; do
		[[ -n ${racing// /} ]] || break
		# PASS[srv]: 1 or 0 once the step is decided; YES/NO: passing and counted failing runs.
		declare -A PASS=() RUNS=() YES=() NO=()
		for run in $(seq 1 "$MAX_RUNS"); do
			# Rotate the order each round so no server always runs first (or last).
			read -r -a order <<<"$racing"
			shift_by=$(((run - 1) % ${#order[@]}))
			order=("${order[@]:shift_by}" "${order[@]:0:shift_by}")
			for srv in "${order[@]}"; do
				[[ -z ${PASS[$srv]:-} ]] || continue
				name=max-$(tag_of "$srv")-$rate-$run
				steady_run "$srv" "$name" "$rate"
				J=$DIR/$name.json
				ok=$(jget "$J" "int($P99_OF <= $P99_MS * 1000 and r['rates']['accepted_per_sec'] >= 0.98 * $rate and r['counters']['rejected'] == 0 and r['counters']['unanswered'] == 0)")
				RUNS[$srv]+="$(jget "$J" '"%.2f ms (seconds: median %.2f, worst %.2f ms; %.1f %% steal, longest %d ms)" % (r["latency"]["submit_window"]["p99_us"]/1000, r["submit_seconds"]["median_p99_us"]/1000, r["submit_seconds"]["worst_p99_us"]/1000, r["machine"]["steal_pct_window"], r["machine"].get("max_steal_burst_ms", 0))'), "
				if [[ $ok == 1 ]]; then
					YES[$srv]=$((${YES[$srv]:-0} + 1))
				elif [[ $(jget "$J" "int(r['machine']['steal_pct_window'] < $MAX_STEAL and r['machine'].get('max_steal_burst_ms', 0) < $MAX_STEAL_BURST)") == 1 ]]; then
					NO[$srv]=$((${NO[$srv]:-0} + 1))
				else
					RUNS[$srv]="${RUNS[$srv]%, } (not counted), "
				fi
				if ((${YES[$srv]:-0} >= MAX_NEED)); then
					PASS[$srv]=1
				elif ((${NO[$srv]:-0} >= MAX_NEED)); then
					PASS[$srv]=0
				elif ((run == MAX_RUNS)); then
					RUNS[$srv]+="undecided after $MAX_RUNS runs (failed runs with steal >= $MAX_STEAL % or a burst >= $MAX_STEAL_BURST ms do not count), "
				fi
			done
		done
		still=
		for srv in $racing; do
			STEPS[$srv]+="$rate: ${RUNS[$srv]%, }; "
			if [[ ${PASS[$srv]:-} == 1 ]]; then
				BEST[$srv]=$rate
				still+="$srv "
			fi
		done
		racing=$still
		unset PASS RUNS YES NO
	done
fi

declare -A FAN
if [[ " $PHASES " == *" fanout "* ]]; then
	for srv in $SERVERS; do
		name=fanout-$(tag_of "$srv")
		start_server "$srv" "$BLOCK_INTERVAL"
		if [[ $srv == pool:* || $srv == old:* ]]; then
			ckload_run "$name" fanout --miners "$MINERS" --workers "$WORKERS" --ramp "$RAMP" \
				--blocks "$BLOCKS" --block-interval "$BLOCK_INTERVAL" \
				--rpc-url "$RPC_URL" --rpc-user "$RPC_USER" --rpc-pass "$RPC_PASS" --quiet || true
		else
			ckload_run "$name" steady --miners "$MINERS" --workers "$WORKERS" --rate 0 \
				--ramp "$RAMP" --duration "$((RAMP + 3 + BLOCKS * BLOCK_INTERVAL))" --quiet || true
		fi
		pool_stop
		J=$DIR/$name.json
		FAN[$srv]=$(jget "$J" '"%d jobs, p50 %.1f / p99 %.1f ms" % (r["fanout"]["jobs_measured"], r["fanout"]["spread"]["p50_us"]/1000, r["fanout"]["spread"]["p99_us"]/1000)')
	done
fi

declare -A RSS SLOPE
if [[ " $PHASES " == *" idle "* ]]; then
	for srv in $SERVERS; do
		ends=()
		counts=()
		for n in $IDLE_MINERS; do
			name=idle-$(tag_of "$srv")-$n
			start_server "$srv"
			ckload_run "$name" steady --miners "$n" --workers "$WORKERS" --rate 0 \
				--ramp "$RAMP" --duration "$((RAMP + IDLE_SECS))" --quiet || true
			pool_stop
			J=$DIR/$name.json
			RSS[$srv]+="$(jget "$J" '"%d B (RSS %.1f -> %.1f MiB, %d miners)" % (r["pool"]["rss_bytes_per_miner"], r["pool"]["rss_kib_start"]/1024, r["pool"]["rss_kib_end"]/1024, r["peak_authorized"])'); "
			ends+=("$(jget "$J" 'r["pool"]["rss_kib_end"]')")
			counts+=("$(jget "$J" 'r["peak_authorized"]')")
		done
		RSS[$srv]=${RSS[$srv]%; }
		if ((${#ends[@]} == 2 && counts[1] > counts[0])); then
			SLOPE[$srv]="$(((ends[1] - ends[0]) * 1024 / (counts[1] - counts[0]))) B per miner from ${counts[0]} to ${counts[1]} miners"
		fi
	done
fi

printf '\nsidebyside: %s; %s miners, %s ckload workers\n\n' "$(machine)" "$MINERS" "$WORKERS"
printf '| server | CPU µs per share at %s/s (median; each run) | submit p99 ms (median; each run) | host steal %% in those runs | max shares/s with p99 <= %s ms | fan-out first->last | RSS per idle miner |\n' "$RATE" "$P99_MS"
printf '| --- | --- | --- | --- | --- | --- | --- |\n'
for srv in $SERVERS; do
	cpu=${CPU[$srv]:-}
	p99=${P99[$srv]:-}
	steal=${STEAL[$srv]:-}
	printf '| %s | %s (%s) | %s (%s) | %s | %s | %s | %s |\n' "$srv" \
		"$( [[ -n $cpu ]] && median "$cpu" || echo -)" "${cpu% }" \
		"$( [[ -n $p99 ]] && median "$p99" || echo -)" "${p99% }" "${steal% }" \
		"${BEST[$srv]:--}" "${FAN[$srv]:--}" "${RSS[$srv]:--}"
done

if [[ -n ${SLOPE[*]:-} ]]; then
	printf '\nRSS of one more idle miner (slope between the idle runs):\n\n'
	for srv in $SERVERS; do
		printf -- '- %s: %s\n' "$srv" "${SLOPE[$srv]:--}"
	done
fi

if [[ " $PHASES " == *" max "* ]]; then
	printf '\nmaximum rate, submit p99 of each run at each step (the %s within %s ms passes a run; %s of %s runs decide a step; a failed run counts only below %s %% steal and with no CPU stolen for %s ms or more at a stretch):\n\n' \
		"$([[ $MAX_BY == window ]] && echo "window's p99" || echo "median of the per-second p99s")" "$P99_MS" "$MAX_NEED" "$MAX_VOTES" "$MAX_STEAL" "$MAX_STEAL_BURST"
	for srv in $SERVERS; do
		printf -- '- %s: best %s; %s\n' "$srv" "${BEST[$srv]:-none}" "${STEPS[$srv]%; }"
	done
fi
