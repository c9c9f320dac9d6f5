#!/usr/bin/env bash
# Peak memory under a burst of large bodies: the release server
# (`serve --dev-self-signed --no-api`) against h2load (Debian's
# nghttp2-client) sending 1 MiB bodies as fast as they are taken, over
# HTTP/2 (64 connections x 32 streams) and over HTTP/1.1 (1000
# connections). Such bodies are not reviews (400 once read); what matters
# is what the server holds while they arrive faster than the body budget
# lets them in. Meanwhile a second h2load sends ordinary reviews
# (examples/admission-review.json) on 8 connections of the same protocol,
# as an apiserver would go on doing. Prints the server's peak RSS (VmHWM)
# and the answers by status, for each protocol and each kind of body.
#
#   cargo build --release --bin image-rewriter
#   scripts/memory-burst.sh [path to the binary]
set -euo pipefail
cd "$(dirname "$0")/.."

binary=${1:-target/release/image-rewriter}
work=$(mktemp -d)
server=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
head -c $((1024 * 1024)) /dev/zero | tr '\0' 'x' >"$work/body"

burst() {
  local name=$1 ordinary=$2
  shift 2
  "$binary" serve --dev-self-signed --no-api --dev-dir "$work/dev" \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$work/server.log" 2>&1 &
  server=$!
  local port=""
  for _ in $(seq 100); do
    port=$(grep -o 'https_addr=[0-9.]*:[0-9]*' "$work/server.log" | head -n 1 | sed 's/.*://') || true
    [ -n "$port" ] && break
    sleep 0.1
  done
  [ -n "$port" ] || { echo "the server did not start:" >&2; cat "$work/server.log" >&2; exit 1; }
  local before
  before=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
  local url="https://127.0.0.1:$port/mutate"
  # shellcheck disable=SC2086 # $ordinary holds h2load's options
  (sleep 0.2 && h2load $ordinary -D 3 -d examples/admission-review.json \
    -H 'content-type: application/json' "$url" >"$work/ordinary" 2>&1) &
  local ordinary_load=$!
  local codes
  codes=$(h2load "$@" -d "$work/body" -H 'content-type: application/json' "$url" 2>&1 |
    grep -E '^(requests|status codes):' | tr '\n' ' ')
  wait "$ordinary_load" || true
  local peak
  peak=$(awk '/VmHWM/ {print $2}' "/proc/$server/status")
  echo "$name: peak RSS $((before / 1024)) MiB idle -> $((peak / 1024)) MiB"
  echo "  the 1 MiB bodies: $codes"
  echo "  ordinary reviews meanwhile: $(grep -E '^(requests|status codes):' "$work/ordinary" | tr '\n' ' ')"
  kill "$server"
  wait "$server" 2>/dev/null || true
  server=""
  rm -rf "$work/dev"
}

burst "HTTP/2, 64 connections x 32 streams, 20 000 bodies of 1 MiB" "-c 8 -m 4" \
  -c 64 -m 32 -n 20000 -t 2
burst "HTTP/1.1, 1000 connections, 10 000 bodies of 1 MiB" "--h1 -c 8" \
  --h1 -c 1000 -n 10000 -t 2
