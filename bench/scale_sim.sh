#!/usr/bin/env bash
# Scale simulation: W worker processes, each with its own local cache, share moto's S3 server on
# loopback and compute a 256-stage DAG (4 layers x 64, 1-3 random edges to the layer before,
# fixed seed) whose stages sleep 1 s, with the real remote, lease and push code
# (cache/benches/scale_sim.rs). Prints a table (W, ideal, makespan, overhead, requests per stage,
# stages computed twice) and writes bench/RESULTS-scale.md.
#
#   bench/scale_sim.sh                          # W = 1, 4, 16, 64 (about 6 minutes)
#   WORKERS=4,16 STAGE_MS=200 bench/scale_sim.sh  # a quick run
#   URL=file:///tmp/simremote bench/scale_sim.sh  # a directory remote instead of moto
#
# Needs moto_server (scripts/setup-test-servers.sh) unless URL is a file:// remote.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS="${WORKERS:-1,4,16,64}"
STAGE_MS="${STAGE_MS:-1000}"
POLL_MIN_MS="${POLL_MIN_MS:-25}"
POLL_MAX_MS="${POLL_MAX_MS:-250}"
OUT="${OUT:-bench/RESULTS-scale.md}"
root="$(pwd)"
work="$(mktemp -d /tmp/wdro-scale-sim.XXXXXX)"
moto_pid=""
cleanup() { [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

if [ -z "${URL:-}" ]; then
  moto="${WDRO_MOTO_SERVER:-${XDG_CACHE_HOME:-$HOME/.cache}/wdro/test-venv/bin/moto_server}"
  [ -x "$moto" ] || { echo "scale_sim: moto_server not found at $moto (run scripts/setup-test-servers.sh)" >&2; exit 1; }
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  "$moto" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
  moto_pid=$!
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  curl -s -f -X PUT "http://127.0.0.1:$port/sim" >/dev/null
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
  export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
  URL="s3://sim/scale"
  server="moto_server $("${moto%/*}/python" -c 'import moto; print(moto.__version__)' 2>/dev/null || echo '?') on 127.0.0.1"
else
  server="$URL"
fi

cargo bench -q -p wdro-cache --bench scale_sim --no-run 2>/dev/null
bin="$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/scale_sim-* | grep -v '\.d$' | head -1)"
table="$("$bin" --url "$URL" --workers "$WORKERS" --stage-ms "$STAGE_MS" \
  --poll-min-ms "$POLL_MIN_MS" --poll-max-ms "$POLL_MAX_MS" --json "$work/rows.json")"
echo "$table"

{
  echo "# Scale simulation (\`bench/scale_sim.sh\`)"
  echo
  echo "$(date -u +%Y-%m-%d), $(nproc) cores ($(uname -m)), load average at start $(cut -d' ' -f1-3 /proc/loadavg);"
  echo "remote: $server; stages of $STAGE_MS ms; idle polls back off from $POLL_MIN_MS to $POLL_MAX_MS ms."
  echo
  echo "DAG: 256 stages in 4 layers of 64, each stage of layers 1-3 reading 1-3 random stages of the"
  echo "layer before (fixed seed). Ideal = max(ceil(256 / W), 4) x stage time (all workers busy, the"
  echo "critical path is 4 stages). Makespan: from the common start signal to the last manifest"
  echo "pushed. Requests: every backend request of every worker (LIST, GET, HEAD, PUT, DELETE)."
  echo
  echo '```'
  echo "$table"
  echo '```'
  echo
  echo "Per run (requests by kind, leases refused because another worker held them, idle polls):"
  echo
  echo '```json'
  cat "$work/rows.json"
  echo
  echo '```'
} > "$(cd "$root" && realpath -m "$OUT")"
echo "wrote $OUT"
