#!/usr/bin/env bash
# Runs every test: the README's test command. Builds the binaries first because the end-to-end
# tests in tests/ start the real `nodeseal`, `nodeseal-agent` and `nodeseal-client` executables.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
python3 -m unittest discover -s client/python
