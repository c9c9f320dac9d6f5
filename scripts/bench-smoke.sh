#!/usr/bin/env bash
# CI smoke for the benchmarks: build first, then the timed part (about a
# minute on 2 cores): every criterion benchmark once, the load benchmark for
# about a second per mode (servers and generator on separate CPUs, then
# once on shared CPUs), h2load against both servers for a second per
# protocol (again with the servers capped, where cgroups allow), and a
# short soak with certificate and config rotation. Fails on any failed
# request or check; the performance goals are printed, not enforced
# (shared CI runners are too noisy for that).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked --bin image-rewriter --example loadbench
cargo bench --locked --bench policy --no-run
cargo bench --locked --bench policy -- --test
"$target_dir/release/examples/loadbench" --no-build --smoke
shared_smoke=$("$target_dir/release/examples/loadbench" --no-build --smoke --placement shared --modes h1 --no-baseline --keep-dir)
echo "$shared_smoke"
kept=$(sed -n 's/^kept //p' <<<"$shared_smoke")
scripts/h2load-compare.sh --duration 1 --rounds 1 "$kept"
# With the servers capped, where the machine lets us (a writable cgroup CPU
# controller, as root); exit status 3 says it does not.
capped_status=0
scripts/h2load-compare.sh --server-quota 50 --duration 1 --rounds 1 "$kept" || capped_status=$?
case "$capped_status" in
  0) ;;
  3) echo "skipped: h2load-compare.sh --server-quota (no writable cgroup CPU controller)" ;;
  *) exit "$capped_status" ;;
esac
rm -rf "$kept"
# Long enough (~4 s here) that the server picks up certificate rotations
# (one a second) while the load runs: 50 000 took 1.0 s once HTTP/2
# backlogs were answered in parts, and no probe saw a new certificate.
"$target_dir/release/examples/loadbench" --no-build --soak --requests 200000
