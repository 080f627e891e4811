#!/usr/bin/env bash
# The project's test command: fetch (or verify the cache of) the default weights, run every test
# of the workspace (the store's tests also against a throwaway Postgres, installed from Debian's
# package when missing and running as root), then the end-to-end tests of `ferrum serve` with
# the official OpenAI Python SDK.
# Fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dev profile builds dependencies and the engine optimised (see Cargo.toml), and the tests
# reuse the same build, so nothing is compiled twice.
cargo run -p ferrum -- pull
log=$(mktemp)
cleanup() {
    rm -f "$log"
    if [[ -n ${FERRUM_TEST_POSTGRES_DIR:-} ]]; then
        scripts/postgres.sh stop "$FERRUM_TEST_POSTGRES_DIR" || true
    fi
}
trap cleanup EXIT
# scripts/postgres.sh exits 2 when no Postgres server binaries are installed: the store's tests
# then run on SQLite only and say so.
pg_status=0
pg_env=$(scripts/postgres.sh) || pg_status=$?
# On a fresh Debian machine (CI) the server binaries are installed from the Debian package.
if [[ $pg_status -eq 2 && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing the Postgres server (Debian package postgresql) for the store's tests"
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q postgresql >/dev/null || { apt-get update -q >/dev/null &&
        apt-get install -y -q postgresql >/dev/null; }; then
        pg_status=0
        pg_env=$(scripts/postgres.sh) || pg_status=$?
    else
        echo "apt-get install postgresql failed"
    fi
fi
# Cases that cannot run here are counted as skipped in the closing line, never as passed.
skipped_extra=0
case $pg_status in
    0) eval "$pg_env" ;;
    2) echo "note: no Postgres server binaries; the store's tests run on SQLite only"
       # one skipped case per store test that runs on every backend
       skipped_extra=$(grep -ho 'databases()' crates/ferrum-store/tests/*.rs | wc -l) ;;
    *) echo "scripts/postgres.sh failed ($pg_status)"; exit 1 ;;
esac
cargo test --workspace --all-targets 2>&1 | tee "$log"
scripts/e2e.sh 2>&1 | tee -a "$log"
# One closing line for the whole run: cargo prints one line per test binary ("N ignored": tests
# whose oracle or environment is absent here), pytest one summary ("N skipped").
awk -v extra="$skipped_extra" '
     function count(i) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i
                         if ($(i+1) ~ /^(ignored|skipped)/) k += $i }
     /^test result:/ { for (i = 1; i <= NF; i++) count(i) }
     /^=* *[0-9]+ (passed|failed|skipped)/ && !/^test result/ { for (i = 1; i <= NF; i++) count(i) }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, k + extra }' "$log"
