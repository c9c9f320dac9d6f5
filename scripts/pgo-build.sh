#!/usr/bin/env bash
# The release build the container image ships: profile-guided (PGO).
#
#   scripts/pgo-build.sh [--with-loadbench] OUT_DIR
#   scripts/pgo-build.sh --dependencies-only
#
# 1. Builds image-rewriter and the load benchmark (examples/loadbench.rs)
#    with -Cprofile-generate.
# 2. Trains them: `loadbench --smoke` runs that server and its bare baseline
#    over HTTP/1.1 keep-alive, HTTP/2 and a new TLS connection per request,
#    with its apiserver-shaped review, and ends them with SIGTERM, so that
#    each writes its profile (the load generator writes its own on exit).
# 3. Merges the profiles with llvm-profdata of rustc's own LLVM version.
# 4. Builds image-rewriter again with -Cprofile-use: OUT_DIR/image-rewriter.
#    With --with-loadbench, loadbench too (OUT_DIR/loadbench), so that the
#    baseline it measures against is built the same way as the server
#    (BENCHMARKS.md, "The shipped build is profile-guided").
#
# Why: a review's cost is mostly serde_json's decoding, branchy code that a
# profile lays out better; the profile-guided server spends about 20% less
# CPU a review (BENCHMARKS.md).
#
# The server and loadbench are built by separate cargo runs, the same in both
# phases: built together, cargo would give the server loadbench's
# dev-dependency features (tokio's test-util, among others), which change
# the symbol names of tokio and of every crate above it, ours included; a
# profile matches functions by those names, so a server built alone would
# find little of a profile made from one built with loadbench. The final
# build passes -pgo-warn-missing-function, and the script fails if the
# review's function (plan_review) is among those the profile does not cover.
#
# The builds are for the host's target triple (`--target`), so that the
# profile flags reach the binaries only, not build scripts and proc-macros;
# RUSTFLAGS from the environment are kept (the image's `+crt-static`). They go
# to $CARGO_TARGET_DIR (default target/) under pgo-generate/ and pgo-use/,
# the profiles under pgo-profiles/. --dependencies-only builds the
# instrumented dependencies and stops (the Dockerfile's cached layer).
#
# llvm-profdata: $LLVM_PROFDATA, else rustup's llvm-tools component
# (`rustup component add llvm-tools`), else `llvm-profdata-N` from Debian's
# llvm-N, N being rustc's LLVM major version (`rustc -vV`). Exits 1 on a
# failed step, 2 on bad arguments.
set -euo pipefail
# Relative paths are the caller's, resolved before moving to the repository.
caller_dir=$PWD
[ -z "${CARGO_TARGET_DIR:-}" ] || CARGO_TARGET_DIR=$(realpath -m -- "$CARGO_TARGET_DIR")
cd "$(dirname "$0")/.."
# Flags and profile paths are this script's: CARGO_ENCODED_RUSTFLAGS would
# replace RUSTFLAGS, LLVM_PROFILE_FILE would move the training's profiles.
unset CARGO_ENCODED_RUSTFLAGS LLVM_PROFILE_FILE

with_loadbench=""
dependencies_only=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --with-loadbench) with_loadbench=1; shift ;;
    --dependencies-only) dependencies_only=1; shift ;;
    -*) echo "pgo-build: unknown option $1" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "pgo-build: one OUT_DIR only" >&2; exit 2; }; out=$(cd "$caller_dir" && realpath -m -- "$1"); shift ;;
  esac
done
if [ -z "$out" ] && [ -z "$dependencies_only" ]; then
  echo "usage: $0 [--with-loadbench] OUT_DIR | --dependencies-only" >&2
  exit 2
fi

host=$(rustc -vV | sed -n 's/^host: //p')
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
generate_dir="$target_dir/pgo-generate"
use_dir="$target_dir/pgo-use"
profiles="$target_dir/pgo-profiles"
given_rustflags=${RUSTFLAGS:-}

# build TARGET_DIR PROFILE_FLAGS CARGO_ARGS...
build() {
  local dir=$1 flags=$2
  shift 2
  echo "pgo-build: cargo build --release --target $host $* ($flags)" >&2
  RUSTFLAGS="${given_rustflags:+$given_rustflags }$flags" CARGO_TARGET_DIR="$dir" \
    cargo build --release --locked --target "$host" "$@"
}

generate="-Cprofile-generate=$profiles/raw"
build "$generate_dir" "$generate" --bin image-rewriter
build "$generate_dir" "$generate" --example loadbench
[ -n "$dependencies_only" ] && exit 0

profdata=${LLVM_PROFDATA:-}
if [ -z "$profdata" ]; then
  for candidate in "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" "llvm-profdata-$llvm_major"; do
    if command -v "$candidate" >/dev/null 2>&1; then
      profdata=$candidate
      break
    fi
  done
fi
if [ -z "$profdata" ]; then
  echo "pgo-build: no llvm-profdata for LLVM $llvm_major (rustc's): rustup component add llvm-tools, or apt-get install llvm-$llvm_major" >&2
  exit 1
fi
profdata_major=$("$profdata" --version | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -n 1)
if [ "$profdata_major" != "$llvm_major" ]; then
  echo "pgo-build: $profdata is LLVM ${profdata_major:-?}, rustc is LLVM $llvm_major: their profile formats may differ" >&2
  exit 1
fi

rm -rf "$profiles"
mkdir -p "$profiles/raw"
echo "pgo-build: training (loadbench --smoke against the instrumented server)" >&2
IMAGE_REWRITER_BIN="$generate_dir/$host/release/image-rewriter" \
  "$generate_dir/$host/release/examples/loadbench" --smoke --no-build
raw=("$profiles"/raw/*.profraw)
if [ ! -e "${raw[0]}" ]; then
  echo "pgo-build: the training wrote no profile under $profiles/raw" >&2
  exit 1
fi
"$profdata" merge -o "$profiles/merged.profdata" "${raw[@]}"
# The training must have run the review itself, not only started servers.
review_counts=$("$profdata" show --counts --function=plan_review "$profiles/merged.profdata")
if ! grep -Eq 'Block counts: \[.*[1-9]' <<<"$review_counts"; then
  echo "pgo-build: the profile has no count for the review (plan_review): the training did not reach the server" >&2
  exit 1
fi

use="-Cprofile-use=$profiles/merged.profdata -Cllvm-args=-pgo-warn-missing-function"
build "$use_dir" "$use" --bin image-rewriter 2>&1 | tee "$profiles/use-build.log" >&2
if grep -E 'no profile data available for function.*plan_review' "$profiles/use-build.log" >&2; then
  echo "pgo-build: the profile does not cover the review (plan_review) in this build: its symbol names differ from the trained build's" >&2
  exit 1
fi
[ -z "$with_loadbench" ] || build "$use_dir" "$use" --example loadbench
mkdir -p "$out"
cp "$use_dir/$host/release/image-rewriter" "$out/image-rewriter"
[ -z "$with_loadbench" ] || cp "$use_dir/$host/release/examples/loadbench" "$out/loadbench"
echo "pgo-build: $out/image-rewriter${with_loadbench:+ and $out/loadbench}, built with $profiles/merged.profdata" >&2
