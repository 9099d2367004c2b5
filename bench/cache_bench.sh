#!/usr/bin/env bash
# Runs the wdro-cache store benchmark in release mode and prints a markdown table
# (copy it into bench/RESULTS-cache.md). Knobs, all optional:
#   WDRO_BENCH_DIR   scratch directory on the disk the cache will live on (default: system temp dir)
#   WDRO_BENCH_MB    large blob size in MiB (default 512)
#   WDRO_BENCH_REPS  repetitions (default 3; the 32 MiB section does at least 5)
# Needs about 3 x WDRO_BENCH_MB of free disk and 2 x WDRO_BENCH_MB of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
# Honours CARGO_TARGET_DIR when set (parallel builds); otherwise the workspace target/.
exec cargo bench -p wdro-cache --bench store -- "$@"
