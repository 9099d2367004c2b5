#!/usr/bin/env bash
# Remote-cache benchmark: push and pull of a 1 GiB cache to moto's S3 server on loopback,
# against the raw speed of moving the same files (cp; boto3 put/get to the same server),
# and the overhead of a fully-remote-hit `wdro run`. Prints a markdown table.
#
#   bench/remote_bench.sh                 # 16 x 64 MiB = 1 GiB
#   FILES=4 MIB=16 bench/remote_bench.sh  # a quick 64 MiB run
#
# Needs moto_server (scripts/setup-test-servers.sh) and curl. Uses $WDRO if set, else builds
# the release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
FILES="${FILES:-16}"
MIB="${MIB:-64}"
JOBS="${JOBS:-8}"
moto="${WDRO_MOTO_SERVER:-${XDG_CACHE_HOME:-$HOME/.cache}/wdro/test-venv/bin/moto_server}"
[ -x "$moto" ] || { echo "remote_bench: moto_server not found at $moto (run scripts/setup-test-servers.sh)" >&2; exit 1; }
command -v curl >/dev/null || { echo "remote_bench: curl is required" >&2; exit 1; }
if [ -z "${WDRO:-}" ]; then
  cargo build --release -q -p wdro
  WDRO="${CARGO_TARGET_DIR:-target}/release/wdro"
fi
WDRO="$(realpath "$WDRO")"

work="$(mktemp -d /tmp/wdro-remote-bench.XXXXXX)"
moto_pid=""
cleanup() { [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$moto" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto_pid=$!
for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
curl -s -f -X PUT "http://127.0.0.1:$port/bench" >/dev/null
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.3f}')"; }
rate() { python3 -c "print(f'{$1 / 2**20 / $2:.0f}')"; }
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" "$@"; }

# The project: FILES pinned local sources of MIB MiB each.
mkdir -p "$work/a/src"
cfg=""
for i in $(seq 0 $((FILES - 1))); do
  head -c $((MIB << 20)) /dev/urandom > "$work/a/src/f$i.bin"
  cfg+="[fetch.f$i]"$'\n'"sources = [\"file:src/f$i.bin\"]"$'\n'"digest = \"sha256:$(sha256sum "$work/a/src/f$i.bin" | cut -d' ' -f1)\""$'\n\n'
done
cfg+="[remote]"$'\n'"url = \"s3://bench/cache\""$'\n'"jobs = $JOBS"$'\n'
for u in a b c d; do mkdir -p "$work/$u"; printf '%s' "$cfg" > "$work/$u/wdro.toml"; done
bytes=$((FILES * (MIB << 20)))

cd "$work/a"
"$WDRO" --no-remote run >/dev/null 2>&1                           # A computes locally
t0=$(now); "$WDRO" push >/dev/null 2>&1; t1=$(now); push=$(secs "$t0" "$t1")
cd "$work/b"
t0=$(now); "$WDRO" pull >/dev/null 2>&1; t1=$(now); pull=$(secs "$t0" "$t1")
"$WDRO" cache verify >/dev/null

# Raw: the same blob files.
blobs=$(find "$work/a/.wdro/cache/blobs" -type f)
sync
t0=$(now); mkdir "$work/copy"; for f in $blobs; do cp "$f" "$work/copy/"; done; sync; t1=$(now); cp_s=$(secs "$t0" "$t1")
# boto3 (from moto's own venv), JOBS threads: a plain S3 client moving the same files.
py="$(dirname "$moto")/python"
raw() {
  "$py" - "$1" "$JOBS" $blobs <<'PY'
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
op, jobs, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
c = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
def put(f):
    with open(f, "rb") as fh:
        c.put_object(Bucket="bench", Key="raw/" + os.path.basename(f), Body=fh.read())
def get(f):
    c.get_object(Bucket="bench", Key="raw/" + os.path.basename(f))["Body"].read()
with ThreadPoolExecutor(jobs) as ex:
    list(ex.map(put if op == "put" else get, files))
PY
}
t0=$(now); raw put; t1=$(now); put_s=$(secs "$t0" "$t1")
t0=$(now); raw get; t1=$(now); get_s=$(secs "$t0" "$t1")

# Fully-remote-hit runs: no transfer (download = minimal) vs an all-local no-op run.
local_runs=(); min_runs=()
for _ in 1 2 3 4 5; do
  cd "$work/a"; t0=$(now); "$WDRO" --no-remote run >/dev/null 2>&1; t1=$(now); local_runs+=("$(secs "$t0" "$t1")")
  rm -rf "$work/c/.wdro"
  cd "$work/c"; t0=$(now); "$WDRO" --set remote.download=minimal run >/dev/null 2>&1; t1=$(now); min_runs+=("$(secs "$t0" "$t1")")
done
local_med=$(median "${local_runs[@]}"); min_med=$(median "${min_runs[@]}")
# A fully-remote-hit run that downloads every result (the default, toplevel) vs `wdro pull`.
cd "$work/d"; t0=$(now); "$WDRO" run >/dev/null 2>&1; t1=$(now); full=$(secs "$t0" "$t1")

cat <<EOF
| what | bytes | seconds | MiB/s |
|---|---|---|---|
| \`wdro push\` to moto S3 ($FILES × $MIB MiB, multipart, $JOBS in flight) | $bytes | $push | $(rate $bytes "$push") |
| \`wdro pull\` from moto S3 (verified, into the local store) | $bytes | $pull | $(rate $bytes "$pull") |
| raw: \`cp\` of the same blob files + sync | $bytes | $cp_s | $(rate $bytes "$cp_s") |
| raw: boto3 \`put_object\` to the same moto, $JOBS threads | $bytes | $put_s | $(rate $bytes "$put_s") |
| raw: boto3 \`get_object\` from the same moto, $JOBS threads | $bytes | $get_s | $(rate $bytes "$get_s") |
| \`wdro run\`, all $FILES stages local hits (median of 5) | – | $local_med | – |
| \`wdro run\`, all $FILES stages remote hits, nothing pulled (download = minimal, median of 5) | – | $min_med | – |
| \`wdro run\`, all remote hits, every result pulled (fresh cache) | $bytes | $full | $(rate $bytes "$full") |

remote-hit overhead without transfer: $(python3 -c "print(f'{($min_med - $local_med) * 1000:.0f}')") ms over an all-local run;
full remote-hit run vs \`wdro pull\` of the same bytes: $(python3 -c "print(f'{($full - $pull) * 1000:.0f}')") ms.
EOF
