#!/bin/sh
# Build every fuzz target and run each for a short time (default 10 s): a CI smoke test that the
# targets still build and that no known-easy crash is back. Long runs: see docs/security.md.
#
# Works on stable Rust: `--sanitizer none` needs no -Z flags (AddressSanitizer would need
# nightly; the code under test forbids `unsafe`, so ASan adds little). Needs cargo-fuzz
# (`cargo install cargo-fuzz`) and a C++ compiler (libFuzzer is built from source).
#
#   fuzz/smoke.sh [SECONDS]
set -eu
secs="${1:-10}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
command -v cargo-fuzz >/dev/null 2>&1 || {
    echo "smoke.sh: cargo-fuzz not found; install it with: cargo install cargo-fuzz" >&2
    exit 1
}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT INT TERM

cargo fuzz build --sanitizer none -O

targets="request_parser token_parser envfile_parser key_loader"
for t in $targets; do
    mkdir -p "$work/$t"
    cp seeds/"$t"/* "$work/$t/"
done
# The committed TEST ONLY key, as PEM and as a PFX with the targets' fixed passphrase; made here
# so that the repository holds exactly one copy of a private key (tests/vectors/v1-testkey.pem).
cp ../tests/vectors/v1-testkey.pem "$work/key_loader/"
openssl pkcs12 -export -in ../tests/vectors/v1-testkey.pem -passout pass:fuzz \
    -out "$work/key_loader/testkey.pfx"

status=0
for t in $targets; do
    echo "== $t (${secs}s)"
    if ! cargo fuzz run --sanitizer none -O "$t" "$work/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 2>"$work/$t.log"; then
        status=1
        tail -n 40 "$work/$t.log" >&2
        echo "smoke.sh: $t FAILED; the crashing input is in fuzz/artifacts/$t/" >&2
    else
        grep -E 'stat::number_of_executed_units|Done' "$work/$t.log" || true
    fi
done
exit "$status"
