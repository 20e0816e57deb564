#!/usr/bin/env bash
# Runs every test: the README's test command. Builds the binaries first because the end-to-end
# tests in tests/ start the real `nodeseal`, `nodeseal-agent` and `nodeseal-client` executables.
#
# Tests that need root carry `#[ignore = "needs root: <why>"]` and live in tests/e2e (the `e2e`
# test binary of nodeseal-tests), where every ignored test is a root-only one. Unprivileged, they
# are listed as ignored with their reason; as root, a second pass runs exactly them and checks
# that all of them ran. With CI=true, not being root is an error: they would be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

is_root=false
[ "$(id -u)" -eq 0 ] && is_root=true
if [ "${CI:-}" = true ] && ! $is_root; then
  echo "scripts/test.sh: CI=true but not running as root: the root-only tests would be skipped" >&2
  exit 1
fi

cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"

if $is_root; then
  if [ $# -gt 0 ]; then
    echo "scripts/test.sh: arguments given, so the root-only tests were not run (add: -p nodeseal-tests --test e2e -- --ignored)" >&2
  else
    expected=$(grep -h '^#\[ignore = "needs root:' tests/e2e/*.rs | wc -l)
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    cargo test --locked -p nodeseal-tests --test e2e -- --ignored 2>&1 | tee "$log"
    ran=$(sed -n 's/^test result: ok\. \([0-9]*\) passed; 0 failed; 0 ignored.*/\1/p' "$log")
    if [ "${ran:-0}" -ne "$expected" ]; then
      echo "scripts/test.sh: ${ran:-0} of the $expected root-only tests ran" >&2
      exit 1
    fi
    echo "root-only tests: $ran of $expected ran"
  fi
fi

python3 -m unittest discover -s client/python
