#!/usr/bin/env bash
# Fetch libtorch 2.13.0 (the version tch 0.26 needs) from PyPI's torch wheel into a per-user cache.
# Usage: setup-libtorch.sh [cpu|cuda]   (default cpu). Prints the LIBTORCH dir on stdout.
#   cpu : $CACHE/2.13.0/cpu   (~486 MB; libtorch_cpu + cudart/cupti, no GPU libs, stub libtorch.so)
#   cuda: $CACHE/2.13.0/cu130-venv/.../site-packages/torch  (full pip install with the nvidia wheels, ~4.7 GB)
# Idempotent: a finished install is marked by .complete and returns in milliseconds.
# Why a stub libtorch.so: the wheel's libtorch.so needs libtorch_cuda.so (470 MB + all of CUDA);
# tch links -ltorch but uses no symbol from it on CPU.
set -euo pipefail
VARIANT="${1:-cpu}"
TORCH_VERSION=2.13.0
CUDART_VERSION='13.0.96.*'   # nvidia-cuda-runtime -> libcudart.so.13 (DT_NEEDED of libtorch_cpu.so)
CUPTI_VERSION='13.0.85.*'    # nvidia-cuda-cupti   -> libcupti.so.13  (DT_NEEDED of libtorch_cpu.so)
CACHE="${WDRO_LIBTORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wdro/libtorch}"
PY="${PYTHON:-python3}"

die() { echo "setup-libtorch: $*" >&2; exit 1; }

if [ "$VARIANT" = cuda ]; then
  VENV="$CACHE/$TORCH_VERSION/cu130-venv"
  if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    echo "pip install torch==$TORCH_VERSION with its nvidia-* wheels (~2.7 GB) ..." >&2
    "$VENV/bin/pip" install --quiet --no-cache-dir "torch==$TORCH_VERSION" >&2 \
      || die "could not install torch==$TORCH_VERSION from PyPI (no network?); nothing cached at $VENV"
    touch "$VENV/.complete"
  fi
  "$VENV/bin/python" -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["platlib"], "torch"))'
  exit 0
fi
[ "$VARIANT" = cpu ] || { echo "usage: $0 [cpu|cuda]" >&2; exit 2; }

DEST="$CACHE/$TORCH_VERSION/cpu"
if [ -f "$DEST/.complete" ]; then echo "$DEST"; exit 0; fi

TMP="$(mktemp -d -t wdro-libtorch.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
rm -rf "$DEST.partial"; mkdir -p "$DEST.partial/lib"

echo "downloading torch==$TORCH_VERSION wheel (~530 MB) into $DEST ..." >&2
"$PY" -m pip download --quiet --no-deps --no-cache-dir -d "$TMP/w" "torch==$TORCH_VERSION" >&2 2>"$TMP/err" \
  || die "cannot download torch==$TORCH_VERSION from PyPI and no cached copy at $DEST: check the network or set WDRO_LIBTORCH_CACHE to a filled cache ($(tail -1 "$TMP/err"))"
"$PY" -m pip download --quiet --no-deps --no-cache-dir -d "$TMP/w" \
    "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION" >&2 2>"$TMP/err" \
  || die "cannot download nvidia-cuda-runtime/cupti from PyPI ($(tail -1 "$TMP/err"))"

"$PY" - "$TMP/w" "$DEST.partial" <<'PYEOF'
import glob, os, shutil, sys, zipfile
wdir, dest = sys.argv[1:3]
torch_libs = {"libc10.so", "libtorch_cpu.so", "libgomp.so.1"}
nv_libs = {"libcudart.so.13", "libcupti.so.13"}
for whl in sorted(glob.glob(os.path.join(wdir, "*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            n = info.filename
            base = n.rsplit("/", 1)[-1]
            if n.endswith("/"):
                continue
            if n.startswith("torch/include/"):
                out = os.path.join(dest, n[len("torch/"):])
            elif n.startswith("torch/lib/") and n.count("/") == 2 and base in torch_libs:
                out = os.path.join(dest, "lib", base)
            elif n.startswith("nvidia/cu13/lib/") and base in nv_libs:
                out = os.path.join(dest, "lib", base)
            else:
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(out, 0o755 if base.startswith("lib") else 0o644)
PYEOF

printf '' | cc -shared -x c - -o "$DEST.partial/lib/libtorch.so"
echo "$TORCH_VERSION" > "$DEST.partial/build-version"   # read by torch-sys's version check
touch "$DEST.partial/.complete"
rm -rf "$DEST"; mv "$DEST.partial" "$DEST"
echo "$DEST"
