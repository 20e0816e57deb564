#!/usr/bin/env bash
# Generates the node packages' man pages and shell completions from the built binaries (their
# hidden `generate-docs` subcommand) plus the hand-written packaging/man pages, in the layout
# the .deb and the tarball install from:
#   OUT/man/man8/nodeseal-agent.8.gz nodeseal-agent-<sub>.8.gz ...
#   OUT/man/man1/nodeseal-client.1.gz nodeseal-client-<sub>.1.gz docker-credential-nodeseal.1.gz
#   OUT/completions/bash/<bin>  OUT/completions/zsh/_<bin>  OUT/completions/fish/<bin>.fish
#
#   packaging/gen-docs.sh --bin-dir DIR --out OUT
#
# OUT is replaced. Man pages are gzipped with -9n (no name or time stamp: reproducible), and
# their date is SOURCE_DATE_EPOCH's when set. Used by build-deb.sh and build-tarball.sh.
set -euo pipefail

die() { echo "gen-docs.sh: error: $*" >&2; exit 1; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
bin_dir=""
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
{ [ -n "$bin_dir" ] && [ -n "$out" ]; } || die "usage: gen-docs.sh --bin-dir DIR --out OUT"
[ -x "$bin_dir/nodeseal-agent" ] \
    || die "$bin_dir/nodeseal-agent not found; build it (cargo build --release -p nodeseal-agent) or pass another --bin-dir"
command -v gzip >/dev/null 2>&1 || die "gzip not found; install it (apt-get install gzip)"

raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT

rm -rf "$out"
install -d -m 0755 "$out/man/man1" "$out/man/man8" \
    "$out/completions/bash" "$out/completions/zsh" "$out/completions/fish"

for b in nodeseal-agent nodeseal-client; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "gen-docs.sh: WARNING: $bin_dir/$b not found; no man pages or completions for it" >&2
        continue
    fi
    "$bin_dir/$b" generate-docs --out "$raw/$b" \
        || die "$bin_dir/$b generate-docs failed (is it older than the generate-docs subcommand? rebuild it)"
    for page in "$raw/$b"/man/*; do
        section="${page##*.}"
        case "$section" in 1|8) ;; *) die "unexpected man page section in $page" ;; esac
        install -m 0644 "$page" "$out/man/man$section/"
    done
    install -m 0644 "$raw/$b/completions/bash/$b" "$out/completions/bash/$b"
    install -m 0644 "$raw/$b/completions/zsh/_$b" "$out/completions/zsh/_$b"
    install -m 0644 "$raw/$b/completions/fish/$b.fish" "$out/completions/fish/$b.fish"
done
install -m 0644 "$repo/packaging/man/docker-credential-nodeseal.1" "$out/man/man1/"

gzip -9n "$out"/man/man1/*.1 "$out"/man/man8/*.8
chmod 0644 "$out"/man/man*/*.gz
echo "gen-docs.sh: $(find "$out/man" -type f | wc -l) man pages, $(find "$out/completions" -type f | wc -l) completion files in $out" >&2
