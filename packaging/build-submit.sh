#!/usr/bin/env bash
# Builds the submit-side (workstation) packages of the seal CLI `nodeseal`:
#   target/nodeseal-cli-<version>-linux-x86_64.tar.gz
#     nodeseal-cli-<version>-linux-x86_64/{bin/nodeseal, man/man1/*.1.gz,
#       completions/{bash/nodeseal,zsh/_nodeseal,fish/nodeseal.fish}, README.md, VERSION}
#   target/debian/nodeseal_<version>-1_amd64.deb   (cargo deb -p nodeseal; lintian-checked)
# and smoke-tests both: the unpacked binary of each runs `cert create` and `seal`.
# Other platforms: cargo install --locked --path seal (or --git <repository> nodeseal).
#
#   packaging/build-submit.sh [--no-build]
#
# Prints the two paths on stdout (tarball, then .deb). Exit status: 0 ok, 1 failure, 2 usage.
set -euo pipefail

die() { echo "build-submit.sh: error: $*" >&2; exit 1; }
say() { echo "build-submit.sh: $*" >&2; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build-submit.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
cd "$repo"
[ -z "${CARGO_TARGET_DIR:-}" ] || [ "$(cd "$CARGO_TARGET_DIR" 2>/dev/null && pwd)" = "$repo/target" ] \
    || die "CARGO_TARGET_DIR is set to $CARGO_TARGET_DIR; unset it (the package assets are under $repo/target)"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)"
    export SOURCE_DATE_EPOCH
fi
version="$(awk '/^\[/{sect=$0} sect=="[workspace.package]" && $1=="version" {gsub(/"/,"",$3); print $3; exit}' Cargo.toml)"
[ -n "$version" ] || die "cannot read version from [workspace.package] in Cargo.toml"

if [ "$build" = 1 ]; then
    say "cargo build --release -p nodeseal"
    cargo build --release --locked -p nodeseal --bins >&2 || die "cargo build --release -p nodeseal failed"
fi
bin=target/release/nodeseal
[ -x "$bin" ] || die "$bin not found; run without --no-build"

# --- man pages and completions (from the binary) ----------------------------------------------
docs=target/nodeseal-cli-docs
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
"$bin" generate-docs --out "$raw/gen" >&2 || die "$bin generate-docs failed"
rm -rf "$docs"
install -d -m 0755 "$docs/man/man1" "$docs/completions/bash" "$docs/completions/zsh" "$docs/completions/fish"
install -m 0644 "$raw"/gen/man/*.1 "$docs/man/man1/"
gzip -9n "$docs"/man/man1/*.1
install -m 0644 "$raw/gen/completions/bash/nodeseal" "$docs/completions/bash/nodeseal"
install -m 0644 "$raw/gen/completions/zsh/_nodeseal" "$docs/completions/zsh/_nodeseal"
install -m 0644 "$raw/gen/completions/fish/nodeseal.fish" "$docs/completions/fish/nodeseal.fish"

# --- tarball ----------------------------------------------------------------------------------
name="nodeseal-cli-$version-linux-x86_64"
stage="$raw/stage/$name"
install -d -m 0755 "$stage/bin"
install -m 0755 "$bin" "$stage/bin/nodeseal"
cp -R "$docs/man" "$docs/completions" "$stage/"
install -m 0644 README.md "$stage/README.md"
echo "$version" > "$stage/VERSION"
tarball="$repo/target/$name.tar.gz"
tar -C "$raw/stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
    -cf - "$name" | gzip -n > "$tarball.tmp"
mv -f "$tarball.tmp" "$tarball"

# --- .deb -------------------------------------------------------------------------------------
cargo deb --version >/dev/null 2>&1 || { say "installing cargo-deb"; cargo install cargo-deb --locked >&2 || die "cargo install cargo-deb failed"; }
deb_out="$( { cargo deb -p nodeseal --no-build 2>&1 1>&3 \
    | { grep -v -F "are detected as Cargo target dir. '../target/nodeseal-cli-docs/" || true; } >&2; } 3>&1 )" \
    || die "cargo deb -p nodeseal failed (see above)"
deb="$(printf '%s\n' "$deb_out" | tail -n 1)"
[ -f "$deb" ] || die "cargo deb did not report a package path (it printed: $deb_out)"
if command -v lintian >/dev/null 2>&1; then
    report="$(lintian --tag-display-limit 0 "$deb" 2>&1 || true)"
    [ -z "$report" ] || printf '%s\n' "$report" >&2
    errors="$(printf '%s\n' "$report" | grep -c '^E: ' || true)"
    [ "$errors" = 0 ] || die "lintian found $errors error(s) in $deb (the E: lines above)"
    say "lintian: 0 errors, $(printf '%s\n' "$report" | grep -c '^W: ' || true) warning(s)"
else
    say "lintian not installed; package not checked"
fi

# --- smoke: each unpacked artifact works on its own -------------------------------------------
smoke() { # nodeseal-binary what
    local d="$raw/smoke-$2" tp out
    mkdir -p "$d"
    tp="$(cd "$d" && "$1" cert create --prefix k --bits 2048 2>/dev/null | tail -n 1)" || die "$2: nodeseal cert create failed"
    [ "${#tp}" = 40 ] || die "$2: cert create printed no thumbprint"
    out="$(printf 'v' | "$1" seal --cert "$d/k.crt" --name N)" || die "$2: nodeseal seal failed"
    [ -n "$out" ] || die "$2: nodeseal seal printed nothing"
}
mkdir "$raw/tar" && tar -xzf "$tarball" -C "$raw/tar"
smoke "$raw/tar/$name/bin/nodeseal" tarball
dpkg-deb -x "$deb" "$raw/deb" || die "dpkg-deb -x $deb failed"
[ -f "$raw/deb/usr/share/man/man1/nodeseal.1.gz" ] || die "$deb has no nodeseal.1.gz"
smoke "$raw/deb/usr/bin/nodeseal" deb
say "tarball and .deb: nodeseal cert create and seal work from each"
echo "$tarball"
echo "$deb"
