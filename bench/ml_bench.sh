#!/usr/bin/env bash
# wdro (Rust, release) vs the PyTorch reference on the same machine and thread count:
#   * one W-PGD iteration (q = 2, ℓ∞, δ = 8/255, ReDLR) over 512 CIFAR-sized images, WRN-16-4;
#   * one W-DRO TRADES training step (R1a, batch 128, K = 10, three-pass forward, SGD momentum).
# Both load the same random WRN-16-4 weights and images (written by the reference script), run
# on the CPU with THREADS intra-op threads and forward/backward batches of BATCH, and report the
# minimum over REPEATS; peak RSS comes from /usr/bin/time -v. Prints a table and writes it to
# bench/RESULTS-ml.md.
#
#   bench/ml_bench.sh                      # THREADS=2 BATCH=128 ITR=5 REPEATS=3
#   PYTHON=/path/to/python bench/ml_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-/root/.cache/wdro/pyref/bin/python}
THREADS=${THREADS:-2}
BATCH=${BATCH:-128}
ITR=${ITR:-5}
REPEATS=${REPEATS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

[ -x /usr/bin/time ] || { echo "error: /usr/bin/time is missing; install the 'time' package" >&2; exit 1; }
"$PYTHON" -c 'import torch, safetensors' 2>/dev/null \
  || { echo "error: $PYTHON cannot import torch and safetensors; set PYTHON to the reference interpreter" >&2; exit 1; }

echo "building the bench (release)..." >&2
cargo bench -p wdro-ml --bench ml_bench --no-run >&2
BIN=$(cargo bench -p wdro-ml --bench ml_bench --no-run --message-format=json 2>/dev/null \
  | "$PYTHON" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ml_bench" and m.get("executable"):
        print(m["executable"])' | tail -1)
[ -n "$BIN" ] || { echo "error: could not find the ml_bench executable" >&2; exit 1; }

"$PYTHON" tests/reference/method_reference.py bench-setup "$WORK/data"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

# run NAME CMD... → $WORK/NAME.json (the JSON line) and $WORK/NAME.rss (peak RSS, KiB)
run() {
  local name=$1; shift
  echo "running $name..." >&2
  /usr/bin/time -v "$@" >"$WORK/$name.out" 2>"$WORK/$name.time"
  grep '^{' "$WORK/$name.out" | tail -1 >"$WORK/$name.json"
  awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/$name.time" >"$WORK/$name.rss"
}
OPTS="batch=$BATCH itr=$ITR repeats=$REPEATS"
run rust_wpgd "$BIN" wpgd "$WORK/data" $OPTS threads=$THREADS
run py_wpgd "$PYTHON" tests/reference/method_reference.py bench wpgd "$WORK/data" $OPTS
run rust_trades "$BIN" trades "$WORK/data" $OPTS threads=$THREADS
run py_trades "$PYTHON" tests/reference/method_reference.py bench trades "$WORK/data" $OPTS

"$PYTHON" - "$WORK" "$THREADS" "$BATCH" "$ITR" "$REPEATS" <<'EOF' | tee bench/RESULTS-ml.md
import json, os, platform, subprocess, sys
w, threads, batch, itr, repeats = sys.argv[1:]
def load(n):
    return json.load(open(os.path.join(w, n + ".json"))), int(open(os.path.join(w, n + ".rss")).read().strip() or 0)
cpu = "unknown CPU"
try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
except Exception:
    pass
import torch
rows = [("W-PGD iteration, 512 images, WRN-16-4", "wpgd"), ("W-DRO TRADES step, batch 128, K = 10", "trades")]
print("# ML benchmark: wdro (Rust, tch, release) vs PyTorch reference\n")
print(f"Machine: {cpu}, {os.cpu_count()} cores; libtorch/PyTorch {torch.__version__}, CPU, {threads} intra-op threads; "
      f"forward/backward batch {batch}; W-PGD timed over {itr} iterations; min of {repeats} repeats.\n")
print("| benchmark | wdro (s) | PyTorch (s) | ratio wdro/PyTorch | wdro peak RSS (MiB) | PyTorch peak RSS (MiB) |")
print("|---|---:|---:|---:|---:|---:|")
for label, key in rows:
    (r, rr), (p, pr) = load("rust_" + key), load("py_" + key)
    print(f"| {label} | {r['seconds']:.3f} | {p['seconds']:.3f} | {r['seconds'] / p['seconds']:.2f} | {rr / 1024:.0f} | {pr / 1024:.0f} |")
print()
print("Same algorithm on both sides (tests/reference/method_reference.py is the PyTorch side). One difference is")
print("structural, not tuning: the PyTorch reference evaluates each W-PGD iterate with a separate forward pass")
print("(as OC23 does), while wdro reuses the forward pass of the next gradient to evaluate the iterate, so a wdro")
print("iteration is one forward + one backward instead of two forwards + one backward. Peak RSS includes each")
print("runtime's own footprint (the Python interpreter and torch import, resp. the Rust binary with libtorch).")
EOF
