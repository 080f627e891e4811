#!/usr/bin/env bash
# The project's test command: fetch (or verify the cache of) the default weights, then run every
# test of the workspace. Fails on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dev profile builds dependencies and the engine optimised (see Cargo.toml), and the tests
# reuse the same build, so nothing is compiled twice.
cargo run -p ferrum -- pull
cargo test --workspace --all-targets
