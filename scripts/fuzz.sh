#!/usr/bin/env bash
# Runs the contract decoder fuzz target for a while (default 60 s).
# Needs a nightly toolchain (cargo fuzz builds with sanitizers); installs
# cargo-fuzz from crates.io when missing.
# Usage: scripts/fuzz.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../contracts"
secs=${1:-60}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: no nightly toolchain here; skipping (the proptest suite covers the decoders on stable)" >&2
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz..." >&2
  cargo install --locked cargo-fuzz >&2
fi
mkdir -p fuzz/corpus/decode
cp -n fuzz/seeds/decode/* fuzz/corpus/decode/ 2>/dev/null || true
echo "fuzz: running the decode target for ${secs}s" >&2
cargo +nightly fuzz run decode fuzz/corpus/decode -- -max_total_time="$secs" -max_len=4096
