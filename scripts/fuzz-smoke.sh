#!/usr/bin/env bash
# CI smoke for the fuzz targets: each target for FUZZ_SECONDS (default 15)
# from the committed seed corpus, into a throwaway corpus directory.
# Fails (non-zero) on any crash, panic or timeout. Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-15}"
cargo +nightly fuzz build -O
for target in reference config admission mutate; do
  work="$(mktemp -d)"
  dict=()
  if [ -f "$target.dict" ]; then dict=("-dict=$target.dict"); fi
  echo "== fuzz $target for ${seconds}s"
  cargo +nightly fuzz run -O "$target" "$work" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}"
  rm -rf "$work"
done
