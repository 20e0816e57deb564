#!/usr/bin/env bash
# Builds the node Debian package target/debian/nodeseal-agent_<version>-1_amd64.deb:
#   1. cargo build --release --locked -p nodeseal-agent -p nodeseal-client --bins
#   2. man pages and shell completions from those binaries into target/nodeseal-docs/
#      (packaging/gen-docs.sh; the .deb's assets in agent/Cargo.toml point there)
#   3. cargo deb -p nodeseal-agent --no-build (runs `cargo install cargo-deb --locked` first
#      when cargo-deb is missing)
#   4. lintian on the package when lintian is installed: prints its report and fails on
#      errors (E:); warnings and info are printed but do not fail.
#
#   packaging/build-deb.sh [--no-build]
#
#   --no-build   use the binaries already in target/release instead of building them
# Prints the package's path on stdout (last line). Exit status: 0 ok, 1 failure (reason on
# stderr), 2 usage error.
set -euo pipefail

die() { echo "build-deb.sh: error: $*" >&2; exit 1; }
say() { echo "build-deb.sh: $*" >&2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
cd "$repo"
# cargo-deb reads the binaries from target/release, and the asset paths in agent/Cargo.toml
# name target/nodeseal-docs: a custom target dir would make them disagree.
[ -z "${CARGO_TARGET_DIR:-}" ] || [ "$(cd "$CARGO_TARGET_DIR" 2>/dev/null && pwd)" = "$repo/target" ] \
    || die "CARGO_TARGET_DIR is set to $CARGO_TARGET_DIR; unset it (the package assets are under $repo/target)"

# Reproducible: man page dates and cargo-deb's archive times follow the last commit.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)"
    export SOURCE_DATE_EPOCH
fi

if [ "$build" = 1 ]; then
    say "cargo build --release (nodeseal-agent, nodeseal-client)"
    # Output to stderr: stdout carries only the package path.
    cargo build --release --locked -p nodeseal-agent -p nodeseal-client --bins >&2 \
        || die "cargo build --release failed (see above)"
fi
for b in nodeseal-agent nodeseal-client docker-credential-nodeseal; do
    [ -x "target/release/$b" ] \
        || die "target/release/$b not found; run without --no-build, or cargo build --release --locked -p nodeseal-agent -p nodeseal-client --bins"
done

"$repo/packaging/gen-docs.sh" --bin-dir target/release --out target/nodeseal-docs

if ! cargo deb --version >/dev/null 2>&1; then
    say "cargo-deb not found; installing it (cargo install cargo-deb --locked)"
    cargo install cargo-deb --locked >&2 || die "cargo install cargo-deb failed; install it by hand and rerun"
fi
# cargo-deb warns that asset paths under ../target/ other than target/release "will not be
# built"; for the generated docs that is the intent, so that one warning is dropped.
deb_out="$( { cargo deb -p nodeseal-agent --no-build 2>&1 1>&3 \
    | { grep -v -F "are detected as Cargo target dir. '../target/nodeseal-docs/" || true; } >&2; } 3>&1 )" \
    || die "cargo deb failed (see above)"
deb="$(printf '%s\n' "$deb_out" | tail -n 1)"
[ -f "$deb" ] || die "cargo deb did not report a package path (it printed: $deb_out)"

if command -v lintian >/dev/null 2>&1; then
    say "lintian $deb"
    # lintian's own exit status also counts pedantic/experimental tags on some versions;
    # decide from the tags instead.
    report="$(lintian --tag-display-limit 0 "$deb" 2>&1 || true)"
    [ -z "$report" ] || printf '%s\n' "$report" >&2
    errors="$(printf '%s\n' "$report" | grep -c '^E: ' || true)"
    warnings="$(printf '%s\n' "$report" | grep -c '^W: ' || true)"
    if [ "$errors" != 0 ]; then
        die "lintian found $errors error(s) in $deb (the E: lines above)"
    fi
    say "lintian: 0 errors, $warnings warning(s)"
else
    say "lintian not installed; package not checked (apt-get install lintian)"
fi
echo "$deb"
