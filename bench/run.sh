#!/bin/sh
# Full benchmark run (a few minutes on 2 cores): builds the release agent, client and harness,
# then writes BENCHMARKS.md and bench/latency.png at the repository root.
# Extra arguments go to the harness, e.g. `bench/run.sh --repeats 3`.
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bins -p nodeseal-agent -p nodeseal-client -p nodeseal-bench
exec target/release/nodeseal-bench --out BENCHMARKS.md --chart bench/latency.png "$@"
