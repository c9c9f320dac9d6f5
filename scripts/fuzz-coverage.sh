#!/usr/bin/env bash
# The edges of our own code (src/) that a fuzz corpus reaches, by file: the
# measure of a plateau that libFuzzer's `cov:` blurs, as it counts every
# edge of the dependencies too (serde_json, the YAML readers, k8s-openapi).
# Replays the corpus once (`-runs=0 -print_coverage=1`), fuzzing nothing.
#
#   scripts/fuzz-coverage.sh TARGET CORPUS_DIR...
#
# Needs the target built: cd fuzz && cargo +nightly fuzz build -O
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: $0 TARGET CORPUS_DIR..." >&2
  exit 2
fi
target="$1"
shift
binary="$root/fuzz/target/x86_64-unknown-linux-gnu/release/$target"
if [ ! -x "$binary" ]; then
  echo "$binary is not built: cd fuzz && cargo +nightly fuzz build -O $target" >&2
  exit 1
fi
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
if ! "$binary" -runs=0 -print_coverage=1 "$@" >"$report" 2>&1; then
  tail -n 20 "$report" >&2
  exit 1
fi
# A line: COVERED_FUNC: hits: H edges: COVERED/ALL NAME FILE:LINE
awk -v src="$root/src/" '
  /^(UN)?COVERED_FUNC:/ && index($NF, src) == 1 {
    split($5, edges, "/")
    file = substr($NF, length(src) + 1)
    sub(/:[0-9]+$/, "", file)
    covered[file] += edges[1]; all[file] += edges[2]
    total_covered += edges[1]; total_all += edges[2]
  }
  END {
    if (total_all == 0) { print "no function of " src " in the report" > "/dev/stderr"; exit 1 }
    for (file in covered) printf "src/%-20s %6d of %6d edges\n", file, covered[file], all[file] | "sort"
    close("sort")
    printf "%-24s %6d of %6d edges\n", "src/ in all", total_covered, total_all
  }' "$report"
