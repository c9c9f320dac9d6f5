#!/usr/bin/env bash
# Server against server, with h2load (Debian's nghttp2-client, written in C)
# as the load generator: it needs far less CPU per request than loadbench's
# reqwest client, so on 2 CPUs it can saturate either server from its own
# core, and the req/s ratio compares the servers rather than the generator.
#
#   cargo run --release --example loadbench -- --smoke --modes h1 --no-baseline --keep-dir
#   scripts/h2load-compare.sh [--duration SECONDS] [--rounds N] [--server-quota PERCENT] <the kept directory>
#
# The servers: $IMAGE_REWRITER_BIN and $LOADBENCH_BIN (the baseline), by
# default the release builds in $CARGO_TARGET_DIR (target/).
#
# The kept directory holds what loadbench generated: config.yaml, tls/,
# request.json (the review it sends) and response.json (the baseline's fixed
# answer). Servers on CPU 0, h2load on CPU 1; HTTP/1.1 (32 connections) and
# HTTP/2 (one connection, 32 streams); three servers alternate: ours, the
# baseline (bare rustls + hyper), and `baseline-io`, the same baseline on
# image-rewriter's own transport (coalesced HTTP/2 writes), so that
# ours / baseline-io is the cost of the handler alone.
# Prints req/s, the server's CPU per request and how busy each side was;
# exits 1 if any request failed, 2 on bad arguments, 3 if --server-quota
# cannot be applied here.
#
# --server-quota PERCENT caps each server at that share of its CPU (a cgroup
# CPU quota, v1 `cpu` or v2 `cpu.max`; needs root). The cheap baseline can
# then be saturated too, by h2load from its own core, so both servers sit at
# the cap and req/s compares them, HTTP/1.1 included; without it h2load is
# the baseline's limit over HTTP/1.1.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=10
rounds=3
quota=""
while [ $# -gt 1 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --server-quota) quota=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
dir=${1:?usage: $0 [--duration SECONDS] [--rounds N] [--server-quota PERCENT] <loadbench --keep-dir directory>}
for file in config.yaml tls/tls.crt tls/tls.key request.json response.json; do
  [ -f "$dir/$file" ] || { echo "$dir/$file is missing (run loadbench with --keep-dir)" >&2; exit 2; }
done
command -v h2load >/dev/null || { echo "h2load is missing: apt-get install nghttp2-client" >&2; exit 2; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 CPUs: the servers on CPU 0, h2load on CPU 1" >&2; exit 2; }

target_dir="${CARGO_TARGET_DIR:-target}"
# The release builds, or the ones named (scripts/pgo-build.sh --with-loadbench
# OUT_DIR builds both profile-guided: OUT_DIR/image-rewriter, OUT_DIR/loadbench).
ours_bin="${IMAGE_REWRITER_BIN:-$target_dir/release/image-rewriter}"
loadbench_bin="${LOADBENCH_BIN:-$target_dir/release/examples/loadbench}"
ticks_per_second=$(getconf CLK_TCK)
failed=0
server=""
capped=""
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  [ -n "$capped" ] && { sleep 0.2; rmdir "$capped" 2>/dev/null; }
  true
}
trap cleanup EXIT

# A cgroup that holds the servers to $quota percent of one CPU; sets
# $capped. Returns 1, having said why, where the machine does not allow it.
# On cgroup v2 it turns the cpu controller on for the root's children and
# leaves it on (other cgroups may rely on it).
cap_servers() {
  local period=100000
  if [ -w /sys/fs/cgroup/cpu ] && [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
    capped=/sys/fs/cgroup/cpu/h2load-compare-$$
    mkdir "$capped" &&
      echo "$period" >"$capped/cpu.cfs_period_us" &&
      echo $((period * quota / 100)) >"$capped/cpu.cfs_quota_us" && return 0
  elif [ -w /sys/fs/cgroup/cgroup.subtree_control ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
    echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    capped=/sys/fs/cgroup/h2load-compare-$$
    mkdir "$capped" && [ -e "$capped/cpu.max" ] &&
      echo "$((period * quota / 100)) $period" >"$capped/cpu.max" && return 0
  fi
  echo "cannot cap the servers: --server-quota needs a writable cgroup CPU controller (root; v1 cpu or v2 cpu.max)" >&2
  return 1
}
if [ -n "$quota" ]; then
  case "$quota" in
    *[!0-9]*) echo "--server-quota takes a whole percentage, got $quota" >&2; exit 2 ;;
  esac
  [ "$quota" -ge 1 ] && [ "$quota" -le 100 ] || { echo "--server-quota must be 1-100" >&2; exit 2; }
  cap_servers || exit 3
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Servers listen below the kernel's ephemeral port range: a port inside it
# can be held by a client's TIME_WAIT socket (thousands of them after
# loadbench's new-connection runs), which a listener cannot bind (CI saw
# "Address already in use").
ephemeral_low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
port_floor=10000
[ "$ephemeral_low" -gt $((port_floor + 100)) ] || port_floor=1024
free_ports=$((ephemeral_low - port_floor - 1))
[ "$free_ports" -ge 100 ] || { echo "the ephemeral port range starts at $ephemeral_low: no room below it for the servers" >&2; exit 2; }

# Starts one server on CPU 0 and waits for /readyz; sets $server and $port.
# A server that exits before it is ready (its port taken after all) is
# started again on another port, up to three times.
start() {
  local attempt
  for attempt in 1 2 3; do
    port=$((port_floor + RANDOM % free_ports))
    if [ "$1" = ours ]; then
      taskset -c 0 "$ours_bin" serve --config "$dir/config.yaml" \
        --tls-cert "$dir/tls/tls.crt" --tls-key "$dir/tls/tls.key" \
        --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$((port + 1))" \
        --namespace image-rewriter >"$dir/h2load-ours.log" 2>&1 &
    else
      local same=()
      [ "$1" = baseline-io ] && same=(--same-transport)
      taskset -c 0 "$loadbench_bin" --baseline-server "${same[@]}" --port "$port" \
        --cert "$dir/tls/tls.crt" --key "$dir/tls/tls.key" \
        --response "$dir/response.json" >"$dir/h2load-$1.log" 2>&1 &
    fi
    server=$!
    if [ -n "$capped" ] && ! echo "$server" >"$capped/cgroup.procs"; then
      echo "cannot cap the servers: moving one into $capped failed" >&2
      exit 3
    fi
    for _ in $(seq 100); do
      curl -skf "https://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
      kill -0 "$server" 2>/dev/null || break
      sleep 0.05
    done
    if kill -0 "$server" 2>/dev/null; then
      break # up, but not ready in 5 s
    fi
    wait "$server" 2>/dev/null || true
    server=""
    echo "$1 exited before it was ready on port $port (try $attempt of 3): $(tail -n 1 "$dir/h2load-$1.log")" >&2
  done
  echo "$1 did not become ready (log: $dir/h2load-$1.log)" >&2
  exit 1
}

load() { # seconds, h2load flags...
  local seconds=$1
  shift
  taskset -c 1 /usr/bin/time -f "h2load-cpu %U %S" h2load -t 1 "$@" -D "$seconds" \
    -d "$dir/request.json" -H 'content-type: application/json' \
    "https://127.0.0.1:$port/mutate?timeout=10s" 2>&1
}

results=$(mktemp)
printf '%-5s %-12s %10s %15s %12s %12s\n' mode server req/s "cpu ms/request" "server busy" "h2load busy"
for mode in h1 h2; do
  if [ "$mode" = h1 ]; then flags=(--h1 -c 32 -m 1); else flags=(-c 1 -m 32); fi
  for _ in $(seq "$rounds"); do
    for side in ours baseline baseline-io; do
      start "$side"
      load 1 "${flags[@]}" >/dev/null
      before=$(cpu_ticks "$server")
      out=$(load "$duration" "${flags[@]}")
      after=$(cpu_ticks "$server")
      kill "$server"
      wait "$server" 2>/dev/null || true
      server=""
      summary=$(grep '^requests:' <<<"$out")
      done_requests=$(awk '{print $6}' <<<"$summary")
      succeeded=$(awk '{print $8}' <<<"$summary")
      if [ -z "$done_requests" ] || [ "$done_requests" != "$succeeded" ] || [ "$succeeded" = 0 ] ||
        ! grep -q "$succeeded 2xx" <<<"$out"; then
        echo "$mode $side: failed requests: $summary" >&2
        grep '^status codes' <<<"$out" >&2 || true
        failed=1
      fi
      awk -v mode="$mode" -v side="$side" -v n="$succeeded" -v s="$duration" \
        -v a="$after" -v b="$before" -v t="$ticks_per_second" \
        -v gen="$(grep '^h2load-cpu' <<<"$out" | awk '{print $2 + $3}')" 'BEGIN {
          rps = n / s; cpu = (a - b) / t
          printf "%-5s %-12s %10.0f %15.4f %11.0f%% %11.0f%%\n", mode, side, rps,
            (rps > 0 ? cpu / (rps * s) * 1000 : 0), cpu / s * 100, gen / s * 100
        }' | tee -a "$results"
    done
  done
done

echo
echo "medians, ours / baseline (and ours / baseline-io):"
# median MODE SERVER COLUMN: the middle value of that column over the rounds.
median() { grep "^$1  *$2 " "$results" | awk "{print \$$3}" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
for mode in h1 h2; do
  for other in baseline baseline-io; do
    awk -v mode="$mode" -v other="$other" -v r1="$(median "$mode" ours 3)" -v r2="$(median "$mode" "$other" 3)" \
      -v c1="$(median "$mode" ours 4)" -v c2="$(median "$mode" "$other" 4)" 'BEGIN {
        printf "  %-3s / %-11s throughput x%.2f (%.0f vs %.0f req/s), cpu/request x%.2f (%.4f vs %.4f ms)\n",
          mode, other, r1 / r2, r1, r2, c1 / c2, c1, c2
      }'
  done
done
if [ -n "$quota" ]; then
  echo "(servers capped at $quota% of CPU 0: both at ~$quota% busy means the servers are compared)"
else
  echo "(a side at ~100% busy set the rate; the server's near 100% means the servers are compared)"
fi
rm -f "$results"
exit "$failed"
