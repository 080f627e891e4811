#!/usr/bin/env bash
# The project's test command: fetch (or verify the cache of) the default weights, then run every
# test of the workspace. Fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dev profile builds dependencies and the engine optimised (see Cargo.toml), and the tests
# reuse the same build, so nothing is compiled twice.
cargo run -p ferrum -- pull
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-targets 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary, the last of which may be
# an example with no tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
