#!/usr/bin/env bash
# The SDK check of the Key Vault fake (.ci/keyvault-sdk-check.py): builds the fake, installs
# Microsoft's azure-keyvault-keys and azure-identity from PyPI into a throwaway virtualenv, and
# drives the fake with them. All traffic in the check stays on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked -p nodeseal-testkit --features kv-fake --bin nodeseal-kv-fake
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv" 2>/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  python3 -m venv "$venv"
}
"$venv/bin/pip" install --quiet --disable-pip-version-check "azure-keyvault-keys>=4.8,<5" "azure-identity>=1.15,<2"
"$venv/bin/python" .ci/keyvault-sdk-check.py "${CARGO_TARGET_DIR:-target}/debug/nodeseal-kv-fake"
