#!/usr/bin/env bash
# Scenario "churn-rss" (SECURITY.md): a 10-minute churn run with hostile clients mixed in, while
# the pool's RSS is sampled every 5 s from /proc/PID/status (VmRSS). Checks that every sample
# after the first minute is within 10 % of the sample at 60 s, and prints the figures.
#
# The hostile clients (`ckload hostile`, from their own source address 127.0.0.9): a username
# flood (a new username authorized per connection), subscribe churn (subscribe, close),
# never-reading connections that keep sending requests, and oversize lines.
#
# Environment: RSS_SECONDS [600], RSS_MINERS [1000], RSS_CHURN [0.02], RSS_RATE [200],
# RSS_FLOOD [20] usernames/s, RSS_SUBCHURN [20] subscribes/s, RSS_READERS [8] never-readers,
# RSS_READER_RATE [1500] requests/s each (fast enough that the pool pauses their reads within a
# second, at `pausereads`, and closes them `stalltimeout` (30 s) later; before back-pressure their
# 1 MiB queues filled and were closed), RSS_OVERSIZE [2] oversize lines/s, RSS_TOLERANCE [0.10];
# and those of lib.sh (BENCH_CKLOAD_NICE=10 suits a shared machine).
# Exit status 1 when a sample after the first minute is off by more than the tolerance.
set -euo pipefail
SCENARIO=churn-rss
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SECS=${RSS_SECONDS:-600}
MINERS=${RSS_MINERS:-1000}
CHURN=${RSS_CHURN:-0.02}
RATE=${RSS_RATE:-200}
FLOOD=${RSS_FLOOD:-20}
SUBCHURN=${RSS_SUBCHURN:-20}
READERS=${RSS_READERS:-8}
READER_RATE=${RSS_READER_RATE:-1500}
OVERSIZE=${RSS_OVERSIZE:-2}
TOLERANCE=${RSS_TOLERANCE:-0.10}
RAMP=10

sampler_pid=""
hostile_pid=""
rss_stop() {
	for p in $sampler_pid $hostile_pid; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
}

bench_setup
rss_status=0
trap 'rss_status=$?; rss_stop; set +e; (exit "$rss_status"); bench_cleanup' EXIT INT TERM

# Sampler: seconds since the start, VmRSS in KiB, every 5 s while the pool runs (bounded by
# the run's length plus a minute).
RSS=$DIR/rss.tsv
: >"$RSS"
(
	start=$(date +%s)
	while kill -0 "$pool_pid" 2>/dev/null; do
		now=$(date +%s)
		((now - start <= SECS + RAMP + 60)) || break
		kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pool_pid/status" 2>/dev/null || true)
		[[ -z $kib ]] || printf '%s\t%s\n' "$((now - start))" "$kib" >>"$RSS"
		sleep 5
	done
) &
sampler_pid=$!

log "ckload hostile for $SECS s: $FLOOD usernames/s, $SUBCHURN subscribes/s, $READERS never-readers at $READER_RATE requests/s, $OVERSIZE oversize lines/s"
"${CKLOAD_PREFIX[@]}" "$CKLOAD" hostile --url "127.0.0.1:$PORT" --source-addr 127.0.0.9 \
	--duration "$SECS" --user-flood "$FLOOD" --subscribe-churn "$SUBCHURN" \
	--never-readers "$READERS" --never-reader-rate "$READER_RATE" --oversize "$OVERSIZE" \
	--json "$DIR/hostile.json" >"$DIR/hostile.txt" 2>&1 &
hostile_pid=$!

ckload_run churn churn --miners "$MINERS" --workers 2 --churn "$CHURN" --rate "$RATE" \
	--ramp "$RAMP" --duration "$((RAMP + SECS))" --quiet
wait "$hostile_pid" || log "ckload hostile exited with $?"
hostile_pid=""
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=""

J=$DIR/churn.json
H=$DIR/hostile.json
printf '\nchurn-rss: %s\n' "$(machine)"
printf 'load average at the end: %s\n' "$(cut -d ' ' -f 1-3 /proc/loadavg)"
printf 'churn: miners %s, churn/s %s, shares/s asked %s, submitted %s, accepted %s, unexpected replies %s, resumes %s (same extranonce1 %s), errors %s\n' \
	"$MINERS" "$CHURN" "$RATE" \
	"$(jget "$J" 'sum(k["submitted"] for k in r["shares"].values())')" \
	"$(jget "$J" 'sum(k["accepted"] for k in r["shares"].values())')" \
	"$(jget "$J" 'r["unexpected_replies"]')" \
	"$(jget "$J" 'r["counters"]["resume_attempts"]')" "$(jget "$J" 'r["counters"]["resume_ok"]')" \
	"$(jget "$J" 'sum(r["errors"].values())')"
printf 'hostile: %s\n' "$(jget "$H" '", ".join(f"{k}: " + " ".join(f"{a}={b}" for a, b in v.items()) for k, v in r.items() if isinstance(v, dict))')"
printf 'hostile: never-reader requests written %s\n' "$(jget "$H" 'r["never_reader_lines"]')"
python3 - "$RSS" "$TOLERANCE" <<'PY'
import sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
tol = float(sys.argv[2])
base = next(((t, k) for t, k in rows if t >= 60), None)
if base is None:
    sys.exit("no RSS sample at or after 60 s")
after = [k for t, k in rows if t >= base[0]]
lo, hi = min(after), max(after)
print(f"RSS samples: {len(rows)} (every 5 s), first {rows[0][1]} KiB at {rows[0][0]} s, last {rows[-1][1]} KiB at {rows[-1][0]} s")
print(f"RSS at {base[0]} s: {base[1]} KiB; after it: min {lo} KiB ({100*(lo-base[1])/base[1]:+.1f} %), max {hi} KiB ({100*(hi-base[1])/base[1]:+.1f} %)")
ok = hi <= base[1] * (1 + tol) and lo >= base[1] * (1 - tol)
print(f"within {100*tol:.0f} % of the 60-s sample: {'yes' if ok else 'NO'}")
sys.exit(0 if ok else 1)
PY
