#!/usr/bin/env bash
# Benchmark (c) of the foundation issue: a no-op `wdro run` on a 6-stage pipeline where every
# stage is cached (goal <= 50 ms wall), beside the same no-op in DVC (`dvc repro`, all stages
# up to date) as the peer. Prints a table; run from the repo root:
#   bench/noop_bench.sh            (installs dvc into ~/.cache/wdro/bench-venv on first use)
#   NO_DVC=1 bench/noop_bench.sh   (wdro only)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p wdro
WDRO="$PWD/target/release/wdro"
RUNS=${RUNS:-30}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# The pipeline: 6 pinned fetch stages of 1 MiB files.
mkdir -p "$tmp/w/src"
: > "$tmp/w/wdro.toml"
for i in 0 1 2 3 4 5; do
  head -c 1048576 /dev/urandom > "$tmp/w/src/f$i.bin"
  h=$(python3 -c "import hashlib,sys;print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest())" "$tmp/w/src/f$i.bin")
  printf '[fetch.f%s]\nsources = ["file:src/f%s.bin"]\ndigest = "sha256:%s"\n\n' "$i" "$i" "$h" >> "$tmp/w/wdro.toml"
done
(cd "$tmp/w" && "$WDRO" run --progress never 2>/dev/null && "$WDRO" run --progress never 2>/dev/null)

time_cmd() { # dir, runs, command...; prints median and min ms
  local dir=$1 n=$2; shift 2
  python3 - "$dir" "$n" "$@" <<'PY'
import subprocess, sys, time, statistics
d, n, cmd = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
ts = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(cmd, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    ts.append((time.perf_counter() - t) * 1000)
print(f"{statistics.median(ts):.1f} {min(ts):.1f}")
PY
}
read -r w_med w_min < <(time_cmd "$tmp/w" "$RUNS" "$WDRO" run --progress never)
rss=$( { /usr/bin/time -f '%M' "$WDRO" run --progress never --json >/dev/null 2>/dev/null; } 2>&1 || true)
[ -x /usr/bin/time ] && rss=$( (cd "$tmp/w" && /usr/bin/time -f '%M' "$WDRO" run --progress never >/dev/null 2>"$tmp/t") ; tail -1 "$tmp/t") || rss="n/a"

printf '\n| tool | command | median ms | min ms | max RSS KB |\n|---|---|---:|---:|---:|\n'
printf '| wdro | `wdro run` (6 stages, all cached) | %s | %s | %s |\n' "$w_med" "$w_min" "$rss"

if [ -z "${NO_DVC:-}" ]; then
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/wdro/bench-venv"
  if [ ! -x "$venv/bin/dvc" ]; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q dvc >/dev/null
  fi
  mkdir -p "$tmp/d" && cp -r "$tmp/w/src" "$tmp/d/"
  (cd "$tmp/d" && git init -q && "$venv/bin/dvc" init -q && {
     echo "stages:"
     for i in 0 1 2 3 4 5; do
       printf '  f%s:\n    cmd: cp src/f%s.bin out%s.bin\n    deps: [src/f%s.bin]\n    outs: [out%s.bin]\n' "$i" "$i" "$i" "$i" "$i"
     done; } > dvc.yaml && "$venv/bin/dvc" repro -q >/dev/null 2>&1)
  read -r d_med d_min < <(time_cmd "$tmp/d" "$((RUNS / 3 + 1))" "$venv/bin/dvc" repro -q)
  printf '| dvc %s | `dvc repro` (6 stages, up to date) | %s | %s | |\n' "$("$venv/bin/dvc" --version)" "$d_med" "$d_min"
  python3 -c "print(f'\nratio wdro/dvc (median): {float(\"$w_med\")/float(\"$d_med\"):.3f}')"
fi
