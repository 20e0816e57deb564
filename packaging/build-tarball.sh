#!/usr/bin/env bash
# Builds the node release tarball target/nodeseal-<version>-linux-x86_64.tar.gz:
#   nodeseal-<version>-linux-x86_64/
#     bin/nodeseal-agent bin/nodeseal-client bin/docker-credential-nodeseal
#     systemd/nodeseal-agent.service systemd/nodeseal-agent.socket systemd/nodeseal.tmpfiles.conf
#     man/man1/*.1.gz man/man8/*.8.gz (packaging/gen-docs.sh, generated from the binaries)
#     completions/bash/<bin> completions/zsh/_<bin> completions/fish/<bin>.fish
#     agent.json (default config)  install.sh (Batch start task installer)  README.md  VERSION
#     slurm/{prolog,epilog,task_prolog}.sh  kubernetes/{Dockerfile,nodeseal-agent.yaml}
#
#   packaging/build-tarball.sh [--no-build] [--bin-dir DIR] [--out-dir DIR]
#
#   --no-build      use binaries that already exist instead of running cargo build --release
#   --bin-dir DIR   where the binaries are (default target/release; env NODESEAL_BIN_DIR)
#   --out-dir DIR   where the tarball goes (default target/)
# Prints the tarball's path on stdout (last line).
set -euo pipefail

die() { echo "build-tarball.sh: error: $*" >&2; exit 1; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
build=1
bin_dir="${NODESEAL_BIN_DIR:-}"
out_dir="$repo/target"
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0; shift ;;
        --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
        --out-dir) out_dir="${2:?--out-dir needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
bin_dir="${bin_dir:-$repo/target/release}"

# The workspace version ([workspace.package] in the root Cargo.toml) is every crate's version.
version="$(awk '/^\[/{sect=$0} sect=="[workspace.package]" && $1=="version" {gsub(/"/,"",$3); print $3; exit}' "$repo/Cargo.toml")"
[ -n "$version" ] || die "cannot read version from [workspace.package] in $repo/Cargo.toml"

if [ "$build" = 1 ]; then
    # The seal CLI (`nodeseal`) is a submit-side tool and is not shipped to nodes.
    (cd "$repo" && cargo build --release --locked -p nodeseal-agent -p nodeseal-client --bins) \
        || die "cargo build --release failed"
fi

[ -x "$bin_dir/nodeseal-agent" ] \
    || die "$bin_dir/nodeseal-agent not found; build it (cargo build --release -p nodeseal-agent) or pass --bin-dir"

name="nodeseal-$version-linux-x86_64"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/$name"
install -d -m 0755 "$root/bin" "$root/systemd"
for b in nodeseal-agent nodeseal-client docker-credential-nodeseal; do
    if [ -x "$bin_dir/$b" ]; then
        install -m 0755 "$bin_dir/$b" "$root/bin/$b"
    else
        echo "build-tarball.sh: WARNING: $bin_dir/$b not found; the tarball will not contain it" >&2
    fi
done
# Reproducible: SOURCE_DATE_EPOCH if set, else the last commit, dates the man pages and the
# tarball's entries.
epoch="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}"
export SOURCE_DATE_EPOCH="$epoch"
# Generated from the binaries being shipped, so the pages describe exactly their options.
"$repo/packaging/gen-docs.sh" --bin-dir "$bin_dir" --out "$stage/docs" \
    || die "cannot generate the man pages and completions (see above)"
cp -R "$stage/docs/man" "$stage/docs/completions" "$root/"
install -m 0644 "$repo/systemd/nodeseal-agent.service" "$repo/systemd/nodeseal-agent.socket" \
    "$repo/systemd/nodeseal.tmpfiles.conf" "$root/systemd/"
install -m 0644 "$repo/packaging/agent.json" "$root/agent.json"
install -m 0755 "$repo/packaging/batch/install.sh" "$root/install.sh"
install -d -m 0755 "$root/slurm" "$root/kubernetes"
install -m 0755 "$repo"/packaging/slurm/prolog.sh "$repo"/packaging/slurm/epilog.sh \
    "$repo"/packaging/slurm/task_prolog.sh "$root/slurm/"
install -m 0644 "$repo/packaging/kubernetes/Dockerfile" "$repo/packaging/kubernetes/nodeseal-agent.yaml" \
    "$root/kubernetes/"
install -m 0644 "$repo/README.md" "$root/README.md"
echo "$version" > "$root/VERSION"
chmod 0644 "$root/VERSION"

mkdir -p "$out_dir"
out="$(cd "$out_dir" && pwd)/$name.tar.gz"
# Reproducible: fixed order, owner and mtime (set above).
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    -cf - "$name" | gzip -n > "$out.tmp"
mv -f "$out.tmp" "$out"
echo "$out"
