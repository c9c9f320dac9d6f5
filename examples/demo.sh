#!/usr/bin/env bash
# Runs the webhook for real on this machine (sample config, throwaway
# self-signed certificate), sends it the AdmissionReview the kube-apiserver
# would send for examples/admission-review.json's pod, and shows the answer.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PORT:-18443}
metrics_port=${METRICS_PORT:-19090}
dir=$(mktemp -d)
cargo build --quiet --locked
"${CARGO_TARGET_DIR:-target}/debug/image-rewriter" serve --dev-self-signed --dev-dir "$dir" \
  --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
  --shutdown-delay 0s >"$dir/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$dir"' EXIT

ready=false
for _ in $(seq 300); do
  curl -sf --cacert "$dir/ca.crt" "https://localhost:$port/readyz" >/dev/null && { ready=true; break; }
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
if [ "$ready" != true ]; then
  echo "demo: the webhook exited or was not ready within 30 s; its log:" >&2
  cat "$dir/server.log" >&2
  exit 1
fi
echo "== webhook ready on https://localhost:$port (CA: $dir/ca.crt)"
echo "== POST /mutate with examples/admission-review.json; the response:"
curl -sS --cacert "$dir/ca.crt" -H 'Content-Type: application/json' \
  --data @examples/admission-review.json "https://localhost:$port/mutate?timeout=10s" \
  | python3 -c '
import base64, json, sys
review = json.load(sys.stdin)
response = review["response"]
patch = response.pop("patch", None)
print(json.dumps(review, indent=2))
if not patch:
    sys.exit("demo: the answer carries no patch: nothing was rewritten")
print("== the patch, base64-decoded:")
print(json.dumps(json.loads(base64.b64decode(patch)), indent=2))
'
echo "== metrics:"
curl -sS "http://127.0.0.1:$metrics_port/metrics" | grep -E '^image_rewriter_(admission_requests|images_rewritten)_total'
