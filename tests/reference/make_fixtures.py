#!/usr/bin/env python3
"""Reference fixtures for wdro-ml's model, checkpoint and data tests, written by real PyTorch.

Run with a Python that has torch 2.13 and numpy (the project uses ~/.cache/wdro/pyref, see
shared/notes/libtorch-setup.md §7):

    ~/.cache/wdro/pyref/bin/python tests/reference/make_fixtures.py

Everything is seeded, so re-running rewrites the same tensors (zip/tar timestamps are fixed
too). CI never runs this: the outputs are committed under tests/fixtures/.

Inputs: the first 16 real CIFAR-10 test images, i.e. the foolbox PNGs vendored in
data/foolbox/cifar10 (decoded here by a minimal PNG reader, since PIL is not assumed).

Outputs (tests/fixtures/models/):
  inputs16.safetensors          `x_u8` u8 [16,3,32,32] as decoded here (models see x_u8/255), `labels` i64.
  wrn16_2.pt                    RobustBench WideResNet(16, 2): torch.save(model.state_dict())
                                (an OrderedDict: the case tch's own loader rejects).
  dmwrn16_2_fp16_nested.pt      DMWideResNet(16, 2, SiLU): {'state_dict': {'module.'+k: fp16},
                                'epoch': 3}, i.e. nested, DataParallel prefix, half precision.
  pt_logits.safetensors         eval-mode logits of the two models above on inputs16.
  formula_logits.safetensors    logits of larger models whose weights follow a closed formula
                                (see `formula_fill`), so no weights need committing; metadata
                                `keys:<model>` = JSON list of the state-dict keys.
  views.pt / views.safetensors  non-contiguous views (transpose, offset slice, shared storage)
                                and the same tensors made contiguous.
  malicious.pt                  a pickle whose __reduce__ calls os.system (must be refused).
  truncated.pt                  the first half of views.pt.
  legacy.pt                     _use_new_zipfile_serialization=False (must be refused with a hint).
tests/fixtures/data/:
  cifar-10-binary-mini.tar.gz   CIFAR-10 binary layout; test_batch.bin = the 20 foolbox images,
                                data_batch_i.bin = images 4(i-1)..4i-1.
  cifar-10-python-mini.tar.gz   the same in the python layout: pickle protocol 2 dicts with a
                                numpy uint8 `data` array and a `labels` list, like the official files.
"""

import io
import json
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
FOOLBOX = ROOT / "data" / "foolbox" / "cifar10"
OUT_M = ROOT / "tests" / "fixtures" / "models"
OUT_D = ROOT / "tests" / "fixtures" / "data"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)
ENGSTROM_STD = (0.2023, 0.1994, 0.2010)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------- PNG (8-bit grey/RGB, no interlace)
def read_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    w, h, depth, ctype, _, _, interlace = hdr
    assert depth == 8 and ctype in (0, 2) and interlace == 0, (path, hdr)
    c = 1 if ctype == 0 else 3
    raw = zlib.decompress(idat)
    stride = w * c
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, dtype=np.int32)
        for x in range(stride):
            a = cur[x - c] if x >= c else 0
            b = prev[x]
            cc = prev[x - c] if x >= c else 0
            if f == 0:
                p = 0
            elif f == 1:
                p = a
            elif f == 2:
                p = b
            elif f == 3:
                p = (a + b) // 2
            elif f == 4:
                pa, pb, pc = abs(b - cc), abs(a - cc), abs(a + b - 2 * cc)
                p = a if (pa <= pb and pa <= pc) else (b if pb <= pc else cc)
            else:
                raise ValueError(f"bad filter {f}")
            cur[x] = (line[x] + p) & 0xFF
        out[y] = cur
        prev = cur
    return out.reshape(h, w, c).transpose(2, 0, 1).copy()  # CHW


def foolbox_images():
    files = sorted(FOOLBOX.glob("cifar10_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    imgs = np.stack([read_png(p) for p in files])
    labels = np.array([int(p.stem.split("_")[-1]) for p in files], dtype=np.int64)
    return imgs, labels


# ---------------------------------------------------------------- RobustBench architectures
# Restated from RobustBench `model_zoo/architectures/{wide_resnet,resnet,dm_wide_resnet}.py`
# (module names and forward order are what matters for the state-dict keys and the logits).
class BasicBlock(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(i)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(o)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.equalInOut = i == o
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(i, o, 1, stride, 0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, n, i, o, stride):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(i if k == 0 else o, o, stride if k == 0 else 1) for k in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth=28, widen_factor=10, sub_block1=False):
        super().__init__()
        c = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, c[0], c[1], 1)
        if sub_block1:
            self.sub_block1 = NetworkBlock(n, c[0], c[1], 1)
        self.block2 = NetworkBlock(n, c[1], c[2], 2)
        self.block3 = NetworkBlock(n, c[2], c[3], 2)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(c[3], 10)
        self.nChannels = c[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.view(-1, self.nChannels))


class ResBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, i, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(i, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or i != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(i, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, i, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(i, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or i != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(i, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, num_blocks):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.linear = nn.Linear(512 * block.expansion, 10)

    def _make_layer(self, block, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, i, planes, stride=1, v2=False):
        super().__init__()
        self.v2 = v2
        self.bn1 = nn.BatchNorm2d(i)
        self.conv1 = nn.Conv2d(i, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or i != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(i, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(out if self.v2 else x)
        else:
            shortcut = x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActResNet(nn.Module):
    def __init__(self, v2=False, bn_before_fc=False):
        super().__init__()
        self.in_planes = 64
        self.bn_before_fc = bn_before_fc
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        for k, (planes, stride) in enumerate([(64, 1), (128, 2), (256, 2), (512, 2)]):
            layers = []
            for s in [stride, 1]:
                layers.append(PreActBlock(self.in_planes, planes, s, v2))
                self.in_planes = planes
            setattr(self, f"layer{k + 1}", nn.Sequential(*layers))
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, 10)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def same_pad(x, stride):
    return F.pad(x, (1, 1, 1, 1)) if stride == 1 else F.pad(x, (0, 1, 0, 1))


class DMBlock(nn.Module):
    def __init__(self, i, o, stride, act):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(i)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(i, o, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(o)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.has_shortcut = i != o
        self.shortcut = nn.Conv2d(i, o, 1, stride, 0, bias=False) if self.has_shortcut else None
        self._stride = stride

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
        else:
            out = self.relu_0(self.batchnorm_0(x))
        v = x if self.has_shortcut else out
        out = self.conv_0(same_pad(v, self._stride))
        out = self.relu_1(self.batchnorm_1(out))
        out = self.conv_1(out)
        return torch.add(self.shortcut(x) if self.has_shortcut else x, out)


class DMBlockGroup(nn.Module):
    def __init__(self, n, i, o, stride, act):
        super().__init__()
        self.block = nn.Sequential(*[DMBlock(i if k == 0 else o, o, stride if k == 0 else 1, act) for k in range(n)])

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    def __init__(self, depth=28, width=10, act=nn.SiLU):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(3, 1, 1), persistent=False)
        c = [16, 16 * width, 32 * width, 64 * width]
        n = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(
            DMBlockGroup(n, c[0], c[1], 1, act), DMBlockGroup(n, c[1], c[2], 2, act), DMBlockGroup(n, c[2], c[3], 2, act)
        )
        self.batchnorm = nn.BatchNorm2d(c[3])
        self.relu = act()
        self.logits = nn.Linear(c[3], 10)
        self.num_channels = c[3]

    def forward(self, x):
        out = (x - self.mean) / self.std
        out = self.layer(self.init_conv(out))
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, 8)
        return self.logits(out.view(-1, self.num_channels))


class DMPreActBlock(nn.Module):
    def __init__(self, i, o, stride, act):
        super().__init__()
        self._stride = stride
        self.batchnorm_0 = nn.BatchNorm2d(i)
        self.relu_0 = act()
        self.conv_2d_1 = nn.Conv2d(i, o, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(o)
        self.relu_1 = act()
        self.conv_2d_2 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.has_shortcut = stride != 1 or i != o
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(i, o, 3, stride, 0, bias=False)

    def forward(self, x):
        out = self.relu_0(self.batchnorm_0(x))
        shortcut = self.shortcut(same_pad(x, self._stride)) if self.has_shortcut else x
        out = self.conv_2d_1(same_pad(out, self._stride))
        out = self.conv_2d_2(self.relu_1(self.batchnorm_1(out)))
        return out + shortcut


class DMPreActResNet(nn.Module):
    def __init__(self, act=nn.SiLU):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(3, 1, 1), persistent=False)
        self.conv_2d = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        spec = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for j, (i, o, s) in enumerate(spec):
            setattr(self, f"layer_{j}", nn.Sequential(DMPreActBlock(i, o, s, act), DMPreActBlock(o, o, 1, act)))
        self.batchnorm = nn.BatchNorm2d(512)
        self.relu = act()
        self.logits = nn.Linear(512, 10)

    def forward(self, x):
        out = self.conv_2d((x - self.mean) / self.std)
        out = self.layer_3(self.layer_2(self.layer_1(self.layer_0(out))))
        out = self.relu(self.batchnorm(out))
        out = F.avg_pool2d(out, 4)
        return self.logits(out.view(out.size(0), -1))


class Normalized(nn.Module):
    """mu/sigma first (the Rice/Wong/Engstrom classes); constants, not state-dict entries."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.mu = torch.tensor(mean).view(1, 3, 1, 1)
        self.sigma = torch.tensor(std).view(1, 3, 1, 1)

    def forward(self, x):
        return self.net((x - self.mu) / self.sigma)


# ---------------------------------------------------------------- weights
def randomize_bn(model, g):
    """Random affine params and running stats, so BN is not the identity in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 1 + 0.2 * torch.randn(c, generator=g)
            m.bias.data = 0.1 * torch.randn(c, generator=g)
            m.running_mean = 0.1 * torch.randn(c, generator=g)
            m.running_var = 0.5 + torch.rand(c, generator=g)
            m.num_batches_tracked = torch.tensor(int(torch.randint(1, 1000, (1,), generator=g)))


def formula(n, j):
    """The closed-form base sequence: sin(0.37·k + 1.3·j), k = 0..n-1, computed in float64."""
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + 1.3 * j)


def formula_fill(model):
    """Deterministic weights that need no RNG: key j (in sorted order) gets `formula(numel, j)`
    scaled by its role. Mirrored by `formula_fill` in ml/tests/models.rs."""
    sd = model.state_dict()
    new = {}
    for j, k in enumerate(sorted(sd)):
        t = sd[k]
        if k.endswith("num_batches_tracked"):
            new[k] = torch.zeros_like(t)
            continue
        b = formula(t.numel(), j).view(t.shape)
        if k.endswith("running_var"):
            v = 1 + 0.5 * b * b
        elif k.endswith("running_mean") or k.endswith("bias"):
            v = 0.1 * b
        elif t.dim() == 1:  # BN weight
            v = 1 + 0.1 * b
        else:  # conv / linear weight
            fan_in = t.numel() // t.shape[0]
            v = b * math.sqrt(2.0 / fan_in)
        new[k] = v.to(t.dtype)
    model.load_state_dict(new)


def write_tgz(path, members):
    with open(path, "wb") as raw:
        import gzip

        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, data in members:
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    ti.mtime = 0
                    ti.mode = 0o644
                    tar.addfile(ti, io.BytesIO(data))


# ---------------------------------------------------------------- main
def main():
    OUT_M.mkdir(parents=True, exist_ok=True)
    OUT_D.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    imgs, labels = foolbox_images()
    assert labels.tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6], labels
    x = torch.from_numpy(imgs[:16]).float() / 255.0
    save_file({"x_u8": torch.from_numpy(imgs[:16]).contiguous(), "labels": torch.from_numpy(labels[:16]).contiguous()}, OUT_M / "inputs16.safetensors")

    # --- real-init models saved as .pt
    g = torch.Generator().manual_seed(20261125)
    torch.manual_seed(0)
    wrn = WideResNet(16, 2).eval()
    randomize_bn(wrn, g)
    torch.save(wrn.state_dict(), OUT_M / "wrn16_2.pt")

    torch.manual_seed(1)
    dm = DMWideResNet(16, 2).eval()
    randomize_bn(dm, g)
    half = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in dm.state_dict().items())
    dm.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in half.items()})
    torch.save({"state_dict": OrderedDict(("module." + k, v) for k, v in half.items()), "epoch": 3}, OUT_M / "dmwrn16_2_fp16_nested.pt")
    with torch.no_grad():
        save_file({"wrn16_2": wrn(x).contiguous(), "dmwrn16_2_fp16_nested": dm(x).contiguous()}, OUT_M / "pt_logits.safetensors")

    # --- formula-weight models: only logits + key lists committed
    models = {
        "preact18_wong": Normalized(PreActResNet(), CIFAR_MEAN, CIFAR_STD),
        "preact18_rice_l2": Normalized(PreActResNet(v2=True, bn_before_fc=True), CIFAR_MEAN, CIFAR_STD),
        "resnet18": ResNet(ResBasicBlock, [2, 2, 2, 2]),
        "resnet50_engstrom": Normalized(ResNet(Bottleneck, [3, 4, 6, 3]), CIFAR_MEAN, ENGSTROM_STD),
        "dmpreact18": DMPreActResNet(),
        "wrn16_2_sub_norm": Normalized(WideResNet(16, 2, sub_block1=True), CIFAR_MEAN, CIFAR_STD),
        "dmwrn28_2": DMWideResNet(28, 2),
    }
    logits, meta = {}, {}
    for name, m in models.items():
        inner = m.net if isinstance(m, Normalized) else m
        formula_fill(inner)
        m.eval()
        with torch.no_grad():
            logits[name] = m(x).contiguous()
        meta["keys:" + name] = json.dumps(sorted(inner.state_dict()))
    save_file(logits, OUT_M / "formula_logits.safetensors", metadata=meta)

    # --- views, malicious, truncated, legacy
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    shared = torch.arange(10, dtype=torch.int64)
    views = {
        "transposed": base.t(),
        "offset_slice": base[1:3, 2:5],
        "strided": base[:, ::2],
        "shared_a": shared[:5],
        "shared_b": shared[5:],
        "half": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
        "scalar": torch.tensor(7, dtype=torch.int64),
    }
    torch.save(views, OUT_M / "views.pt")
    save_file({k: v.contiguous().clone() for k, v in views.items()}, OUT_M / "views.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned-by-pickle",))

    torch.save({"weight": torch.zeros(2), "evil": Evil()}, OUT_M / "malicious.pt")
    data = (OUT_M / "views.pt").read_bytes()
    (OUT_M / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(2)}, OUT_M / "legacy.pt", _use_new_zipfile_serialization=False)

    # --- mini CIFAR archives from the 20 real test images
    n_train = [range(4 * i, 4 * i + 4) for i in range(5)]
    bin_members = [("cifar-10-batches-bin/batches.meta.txt", ("\n".join(CLASSES) + "\n\n").encode())]
    py_members = []
    for i, idx in enumerate(n_train + [range(20)]):
        name = f"data_batch_{i + 1}" if i < 5 else "test_batch"
        idx = list(idx)
        rec = b"".join(bytes([labels[k]]) + imgs[k].tobytes() for k in idx)
        bin_members.append((f"cifar-10-batches-bin/{name}.bin", rec))
        d = {
            "batch_label": f"mini {name}",
            "labels": [int(labels[k]) for k in idx],
            "data": imgs[idx].reshape(len(idx), 3072).copy(),
            "filenames": [f"img_{k}.png" for k in idx],
        }
        py_members.append((f"cifar-10-batches-py/{name}", pickle.dumps(d, protocol=2)))
    meta = {"num_cases_per_batch": 10000, "label_names": CLASSES, "num_vis": 3072}
    py_members.append(("cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2)))
    write_tgz(OUT_D / "cifar-10-binary-mini.tar.gz", bin_members)
    write_tgz(OUT_D / "cifar-10-python-mini.tar.gz", py_members)
    print("fixtures written:", sorted(p.name for p in OUT_M.iterdir()), sorted(p.name for p in OUT_D.iterdir()))


if __name__ == "__main__":
    main()
