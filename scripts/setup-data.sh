#!/usr/bin/env bash
# Offline real data for wdro, fetched from package registries only (shared/notes/offline-data.md).
# Idempotent: a second run checks one marker file and returns in milliseconds.
#
# Makes ${XDG_CACHE_HOME:-$HOME/.cache}/wdro/data/ (the repo's .data links to it):
#   fashion-mnist/            -> /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist)
#                                {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#   foolbox/{cifar10,fashionMNIST,mnist}/*.png   first 20 test images (foolbox 3.3.4 wheel)
#   foolbox/LICENSE
#   cifar-10-model/cnn_model.h5            Keras 2.9 weights (cifar-10-model 7.4.0 wheel)
#   cifar-10-model/cnn_model.safetensors   the same weights, Keras names and layouts
#                                          (`<layer>/<param>:0`; wdro maps them to PyTorch)
#   THIRD_PARTY.md                         licences and credits
# Every download is pinned by version and sha256; a mismatch aborts (no fallback data).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/wdro/data"
MARK="$CACHE/.complete-v1"
FOOLBOX_WHL=foolbox-3.3.4-py3-none-any.whl
FOOLBOX_SHA=11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb
C10_WHL=cifar_10_model-7.4.0-py3-none-any.whl
C10_SHA=bf1d74404875d39bb874df97d7b924b98af81e85c4bccb6091ef3a115dd9920a
H5_SHA=0eddc60b9fcbcab498ff07c8430a94ef1d0ee5ac04ad2d0c75d4977cc25cf9e9
FMNIST_DEB_DIR=/usr/share/datasets/fashion-mnist

die() { echo "setup-data.sh: $*" >&2; exit 1; }

link_repo() {
  if [ "$(readlink .data 2>/dev/null || true)" != "$CACHE" ]; then
    [ -e .data ] && [ ! -L .data ] && die ".data exists and is not a symlink; move it away"
    ln -sfn "$CACHE" .data
  fi
}

if [ -f "$MARK" ] && [ -e "$CACHE/fashion-mnist/t10k-labels-idx1-ubyte.gz" ]; then
  link_repo
  exit 0
fi

# 1. Fashion-MNIST from Debian.
if [ ! -d "$FMNIST_DEB_DIR" ]; then
  as_root=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && as_root=sudo; } \
    || die "Fashion-MNIST missing: install the Debian package dataset-fashion-mnist (needs root)"
  echo "setup-data.sh: installing dataset-fashion-mnist (apt)" >&2
  $as_root apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $as_root apt-get update -q >/dev/null 2>&1 && $as_root apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || die "cannot install dataset-fashion-mnist (no network to the Debian mirror and no cached copy?)"
fi
sha256sum -c --quiet - <<EOF >/dev/null || die "Fashion-MNIST files in $FMNIST_DEB_DIR do not match their pinned sha256"
b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7  $FMNIST_DEB_DIR/train-images-idx3-ubyte.gz
0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056  $FMNIST_DEB_DIR/train-labels-idx1-ubyte.gz
cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa  $FMNIST_DEB_DIR/t10k-images-idx3-ubyte.gz
8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05  $FMNIST_DEB_DIR/t10k-labels-idx1-ubyte.gz
EOF

mkdir -p "$CACHE"
ln -sfn "$FMNIST_DEB_DIR" "$CACHE/fashion-mnist"

# 2. Wheels (pinned version + sha256), kept in the cache so a re-run needs no network.
WHEELS="$CACHE/wheels"
mkdir -p "$WHEELS"
fetch_wheel() { # name==version file sha
  local spec=$1 file=$2 sha=$3
  if [ ! -f "$WHEELS/$file" ] || ! echo "$sha  $WHEELS/$file" | sha256sum -c --quiet - >/dev/null 2>&1; then
    rm -f "$WHEELS/$file"
    python3 -m pip download -q --no-deps --disable-pip-version-check "$spec" -d "$WHEELS" >/dev/null 2>&1 \
      || die "cannot download $spec from PyPI (offline?) and no cached copy in $WHEELS"
  fi
  echo "$sha  $WHEELS/$file" | sha256sum -c --quiet - >/dev/null 2>&1 \
    || die "$file does not match its pinned sha256 $sha"
}
fetch_wheel foolbox==3.3.4 "$FOOLBOX_WHL" "$FOOLBOX_SHA"
fetch_wheel cifar-10-model==7.4.0 "$C10_WHL" "$C10_SHA"

# 3. Unpack what is needed (python's zipfile: no unzip needed).
python3 - "$WHEELS" "$CACHE" <<'PY'
import os, shutil, sys, zipfile
wheels, cache = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(os.path.join(wheels, "foolbox-3.3.4-py3-none-any.whl")) as z:
    for prefix in ("cifar10_", "fashionMNIST_", "mnist_"):
        d = os.path.join(cache, "foolbox", prefix.rstrip("_"))
        os.makedirs(d, exist_ok=True)
        for n in z.namelist():
            b = os.path.basename(n)
            if n.startswith("foolbox/data/") and b.startswith(prefix) and b.endswith(".png"):
                with open(os.path.join(d, b), "wb") as f:
                    f.write(z.read(n))
    with open(os.path.join(cache, "foolbox", "LICENSE"), "wb") as f:
        f.write(z.read("foolbox-3.3.4.dist-info/LICENSE"))
os.makedirs(os.path.join(cache, "cifar-10-model"), exist_ok=True)
with zipfile.ZipFile(os.path.join(wheels, "cifar_10_model-7.4.0-py3-none-any.whl")) as z:
    with open(os.path.join(cache, "cifar-10-model", "cnn_model.h5"), "wb") as f:
        f.write(z.read("cifar_10_model/trained_models/cnn_model.h5"))
PY
echo "$H5_SHA  $CACHE/cifar-10-model/cnn_model.h5" | sha256sum -c --quiet - >/dev/null 2>&1 \
  || die "cnn_model.h5 does not match its pinned sha256 $H5_SHA"
n=$(ls "$CACHE/foolbox/cifar10" | wc -l)
[ "$n" = 20 ] || die "expected 20 CIFAR-10 PNGs from the foolbox wheel, found $n"

# 4. HDF5 -> safetensors with h5py in a small per-user venv (h5py + numpy wheels only).
VENV="$CACHE/venv-h5py"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import h5py' 2>/dev/null; then
  python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "h5py==3.16.0" >/dev/null 2>&1 \
    || die "cannot install h5py into $VENV (offline?)"
fi
"$VENV/bin/python" - "$CACHE/cifar-10-model" <<'PY'
# Writes safetensors by hand (8-byte little-endian header length, JSON header, raw data) so
# that only h5py/numpy are needed. Keys: `<layer>/<param>:0` from model_weights/<layer>/<layer>/.
import json, os, struct, sys
import h5py, numpy as np
d = sys.argv[1]
tensors = {}
with h5py.File(os.path.join(d, "cnn_model.h5"), "r") as f:
    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.startswith("model_weights/"):
            parts = name.split("/")
            tensors[parts[-2] + "/" + parts[-1]] = np.ascontiguousarray(obj[()], dtype="<f4")
    f.visititems(visit)
n = sum(t.size for t in tensors.values())
assert len(tensors) == 42 and n == 969418, (len(tensors), n)
header, off, blobs = {}, 0, []
for k in sorted(tensors):
    b = tensors[k].tobytes()
    header[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [off, off + len(b)]}
    off += len(b)
    blobs.append(b)
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
tmp = os.path.join(d, "cnn_model.safetensors.partial")
with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
os.replace(tmp, os.path.join(d, "cnn_model.safetensors"))
PY

# 5. Notices.
cat > "$CACHE/THIRD_PARTY.md" <<'EOF'
# Third-party data used by wdro (fetched by scripts/setup-data.sh, not redistributed)

* Fashion-MNIST — Xiao, Rasul & Vollgraf (2017), "Fashion-MNIST: a Novel Image Dataset for
  Benchmarking Machine Learning Algorithms". MIT licence, Copyright (c) 2017 Zalando SE.
  Debian package dataset-fashion-mnist (packaging Copyright 2019-2020 Mo Zhou, MIT).
* foolbox 3.3.4 sample images (first 20 test images of CIFAR-10, Fashion-MNIST, MNIST) —
  MIT licence, Copyright (c) 2020 Jonas Rauber et al. (foolbox/LICENSE). CIFAR-10: Krizhevsky
  (2009), "Learning Multiple Layers of Features from Tiny Images". MNIST: LeCun, Cortes, Burges.
* cifar-10-model 7.4.0 (PyPI) pretrained Keras CNN — author Siddharth Gudiduri. The package
  metadata states "License: BSD-3" while its classifier states "OSI Approved :: MIT License";
  the wheel ships no licence text. Both are permissive; credited here, not redistributed.
EOF

touch "$MARK"
link_repo
echo "setup-data.sh: offline data ready in $CACHE (.data)" >&2
