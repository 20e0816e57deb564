#!/usr/bin/env bash
# The packaging part of CI (called by .ci/run):
#   1. installs lintian with apt when it is missing,
#   2. packaging/build-deb.sh: release build, man pages and completions, .deb, lintian,
#   3. packaging/check-units.sh: systemd unit checks and the exposure score,
#   4. packaging/build-tarball.sh --no-build --bin-dir target/release,
#   5. packaging/kubernetes/check.sh: the Dockerfile and DaemonSet manifest, offline,
#   6. packaging/build-submit.sh: the workstation CLI's tarball and .deb, smoke-tested.
# Prints one summary line per step ("packaging-ci: <step>: ok ..." or "... FAILED") and stops at
# the first failing step. Exit status: 0 all ok, 1 a step failed.
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
summary=()
note() { # line
    summary+=("$1")
    echo "packaging-ci: $1"
}
fail() { # step reason
    note "$1: FAILED ($2)"
    echo "packaging-ci: summary:"
    printf '  %s\n' "${summary[@]}"
    exit 1
}

# --- 1. lintian --------------------------------------------------------------------------------
t=$SECONDS
if command -v lintian >/dev/null 2>&1; then
    note "lintian: already installed ($(lintian --version 2>/dev/null | head -n 1))"
else
    echo "packaging-ci: installing lintian"
    if ! { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null; }; then
        fail lintian "apt-get install lintian failed; the .deb cannot be checked"
    fi
    note "lintian: installed ($(lintian --version 2>/dev/null | head -n 1), $((SECONDS - t))s)"
fi

# --- 2. .deb -----------------------------------------------------------------------------------
t=$SECONDS
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# stderr goes to the console as it comes and to $log for the summary; stdout is the path.
if ! deb="$( { packaging/build-deb.sh 2>&1 1>&3 | tee "$log" >&2; } 3>&1 )"; then
    fail build-deb "packaging/build-deb.sh failed; see its output above"
fi
deb="$(printf '%s\n' "$deb" | tail -n 1)"
lint="$(grep -o 'lintian: 0 errors, [0-9]* warning(s)' "$log" || echo 'lintian not run')"
note "build-deb: ok: $(basename "$deb") ($(du -k "$deb" | cut -f1) KiB, $lint, $((SECONDS - t))s)"

# --- 3. systemd units --------------------------------------------------------------------------
t=$SECONDS
set +e
units_out="$(packaging/check-units.sh 2>&1)"
rc=$?
set -e
printf '%s\n' "$units_out"
case "$rc" in
    0) note "check-units: ok: $(printf '%s\n' "$units_out" | grep '^exposure: ' | tail -n 1) ($((SECONDS - t))s)" ;;
    77) note "check-units: skipped (systemd-analyze not installed)" ;;
    *) fail check-units "packaging/check-units.sh exited $rc; see its output above" ;;
esac

# --- 4. tarball --------------------------------------------------------------------------------
t=$SECONDS
if ! tarball="$(packaging/build-tarball.sh --no-build --bin-dir target/release)"; then
    fail build-tarball "packaging/build-tarball.sh failed; see its output above"
fi
tarball="$(printf '%s\n' "$tarball" | tail -n 1)"
entries="$(tar -tzf "$tarball" | wc -l)"
note "build-tarball: ok: $(basename "$tarball") ($(du -k "$tarball" | cut -f1) KiB, $entries entries, $((SECONDS - t))s)"

# --- 5. Kubernetes recipe (offline validators) --------------------------------------------------
t=$SECONDS
if ! packaging/kubernetes/check.sh --agent target/release/nodeseal-agent; then
    fail kubernetes "packaging/kubernetes/check.sh failed; see its output above"
fi
note "kubernetes: ok: Dockerfile (hadolint), nodeseal-agent.yaml (kubernetes-validate --strict), agent.json ($((SECONDS - t))s)"

# --- 6. submit side: nodeseal tarball and .deb ----------------------------------------------------
t=$SECONDS
if ! submit="$(packaging/build-submit.sh)"; then
    fail build-submit "packaging/build-submit.sh failed; see its output above"
fi
note "build-submit: ok: $(printf '%s\n' "$submit" | xargs -n1 basename | tr '\n' ' ')(smoke-tested, $((SECONDS - t))s)"

echo "packaging-ci: summary ($((SECONDS - start))s):"
printf '  %s\n' "${summary[@]}"
