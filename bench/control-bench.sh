#!/usr/bin/env bash
# Control-path benchmark: builds the release daemon and runs bench/control_bench.py against
# `cloudsim` in its own process (see that file for what is measured).
#   bench/control-bench.sh [--quick] [--max-volumes N] [--sim-in-process]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p volume-daemon -p cloudsim --bins
exec python3 bench/control_bench.py --daemon target/release/volume-daemon "$@"
