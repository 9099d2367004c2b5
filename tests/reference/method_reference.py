#!/usr/bin/env python3
"""Independent PyTorch reference of the wdro method, written from shared/spec/method.md.

It trains a tiny BatchNorm CNN on real Fashion-MNIST images, then computes on the first 32
Fashion-MNIST test images:

* Υ (spec §2.1) for CE, DLR, ReDLR and s* ∈ {1, 2}: per-sample gradient norms and Υ for q = 1, 2;
* W-PGD (spec §3.1) for all four (q, s) pairs with ReDLR and CE (5 iterations), plus the `sphere`
  and `scale` projection variants; W-FGSM for the four pairs;
* W-PGD-budget reading R1 (spec §3.2) for q = 2, s ∈ {∞, 2};
* W-DRO TRADES steps (spec §4.1, §4.3): two R1a steps (three-pass forward, SGD momentum) and
  one R2 step, with the Gaussian start noise fixed and stored;
* fine-tuning variant A's last-layer re-initialisation after `manual_seed(0)` (spec §5);

and writes the model, the data slice and the expected tensors/numbers to tests/fixtures/method/.

`bench-setup DIR` / `bench wpgd|trades DIR` time the same algorithms on a WideResNet-16-4
(RobustBench `wide_resnet.py`, spec §7.3) for bench/ml_bench.sh.
The Rust tests (ml/tests/reference.rs) must reproduce them. CI never runs this script: the files
it writes are committed. Run with the project's reference interpreter:

    /root/.cache/wdro/pyref/bin/python tests/reference/method_reference.py

Written from the spec, not from the Rust code: each function follows the spec's formula and
pseudocode with plain PyTorch ops. Evaluation of an iterate is a separate no-grad forward pass
here (as in OC23), which the Rust side fuses with the next gradient pass.
"""

import gzip
import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "method")
FMNIST = "/usr/share/datasets/fashion-mnist"

EPS_ATTACK = 1e-8  # spec §3.1
EPS_DLR = 1e-12  # spec §2.5
N_TEST = 32
BATCH = 16  # batch size of every gradient/eval pass (Rust uses the same)
ITR = 5
RATIO = 1.875


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


class TinyNet(nn.Module):
    """conv(1→8) BN ReLU, conv(8→16, s2) BN ReLU, conv(16→32, s2) BN ReLU, global avg, fc(32→10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = F.relu(self.bn3(self.conv3(h)))
        h = F.adaptive_avg_pool2d(h, [1, 1]).flatten(1)
        return self.fc(h)


# ---------------------------------------------------------------- losses (spec §2.5)


def loss_ce(z, y):
    return F.cross_entropy(z, y, reduction="none")


def _sorted(z, y):
    zs, ind = z.sort(dim=1)
    top_is_y = (ind[:, -1] == y).float()
    zy = z.gather(1, y.unsqueeze(1)).squeeze(1)
    return zs, top_is_y, zy


def loss_dlr(z, y):
    zs, t, zy = _sorted(z, y)
    num = zy - zs[:, -2] * t - zs[:, -1] * (torch.ones_like(t) - t)
    return -num / (zs[:, -1] - zs[:, -3] + EPS_DLR)


def loss_redlr(z, y):
    zs, t, zy = _sorted(z, y)
    return -(zy - zs[:, -2]) / (zs[:, -1] - zs[:, -3] + EPS_DLR) * t


LOSSES = {"ce": loss_ce, "dlr": loss_dlr, "redlr": loss_redlr}


def kl_sum(logits_adv, logits_nat):
    """KLDivLoss(sum) of (log_softmax(f(x')), softmax(f(x)))."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="sum")


# ---------------------------------------------------------------- Υ (spec §2.1)


def input_grads(model, X, y, loss):
    """Per-sample ∇x J_i: backprop the sum of per-sample losses per batch (eval mode)."""
    model.eval()
    out = []
    for s in range(0, X.shape[0], BATCH):
        xb = X[s : s + BATCH].detach().clone().requires_grad_(True)
        l = LOSSES[loss](model(xb), y[s : s + BATCH])
        (g,) = torch.autograd.grad(l.sum(), [xb])
        out.append(g)
    return torch.cat(out)


def img_norm(t, p):
    return torch.linalg.vector_norm(t, ord=p, dim=(1, 2, 3))


def upsilon(model, X, y, loss, s_star):
    g = input_grads(model, X, y, loss)
    n = img_norm(g, s_star)
    return n, {q: float(n.double().pow(q).mean().pow(1.0 / q)) for q in (1, 2)}


def evaluate(model, X, y, loss):
    model.eval()
    correct, ls = [], []
    with torch.no_grad():
        for s in range(0, X.shape[0], BATCH):
            z = model(X[s : s + BATCH])
            correct.append(z.argmax(1) == y[s : s + BATCH])
            ls.append(LOSSES[loss](z, y[s : s + BATCH]))
    correct = torch.cat(correct)
    return int(correct.sum()), float(torch.cat(ls).mean()), correct


# ---------------------------------------------------------------- W-PGD (spec §3.1)


def w2_len(D, s):
    """((1/N) Σ ‖D_i‖_s²)^{1/2} as a float32 reduction read as a Python float."""
    return float(img_norm(D, math.inf if s == "inf" else 2).pow(2).mean().pow(0.5))


def direction(G, q, s):
    s_star = 1 if s == "inf" else 2
    gn = img_norm(G, s_star).reshape(-1, 1, 1, 1)
    D = torch.sign(G) * G.abs().pow(s_star - 1) * (gn + EPS_ATTACK).pow(q - s_star)
    if q == 2:
        D = D / (w2_len(D, s) + EPS_ATTACK)
    return D


def project(X, X0, q, s, delta, l2_proj="ball", linf_proj="clip"):
    dlt = X - X0
    if q == 1 and s == "inf":
        return X0 + dlt.clamp(-delta, delta)
    if q == 1:
        n = img_norm(dlt, 2).reshape(-1, 1, 1, 1) + EPS_ATTACK
        if l2_proj == "sphere":
            return X0 + dlt * delta / n
        return X0 + dlt * (delta / n).clamp(max=1.0)
    dist = w2_len(dlt, s)
    rho = min(1.0, delta / (dist + EPS_ATTACK))
    if s == "inf" and linf_proj == "clip":
        c = img_norm(dlt, math.inf).reshape(-1, 1, 1, 1)
        return X0 + dlt.clamp(-rho * c, rho * c)
    return X0 + dlt * rho


def w_pgd(model, X0, y, q, s, delta, loss, itr, ratio, l2_proj="ball", linf_proj="clip"):
    step = ratio * delta / itr
    X = X0.clone()
    acc_min, loss_max, X_adv = 1.0, -math.inf, X0.clone()
    curve = []
    n = X0.shape[0]
    for t in range(itr):
        G = input_grads(model, X, y, loss)
        X = X + step * direction(G, q, s)
        X = project(X, X0, q, s, delta, l2_proj, linf_proj).clamp(0, 1)
        c, l, _ = evaluate(model, X, y, loss)
        curve.append((c, l))
        if c / n < acc_min:
            acc_min, X_adv = c / n, X.clone()
        loss_max = max(loss_max, l)
    return X_adv, X, acc_min, loss_max, curve


# ---------------------------------------------------------------- W-PGD-budget R1 (spec §3.2)


def w_pgd_budget_r1(model, X0, y, q, s, delta, loss, itr, ratio):
    s_star = 1 if s == "inf" else 2
    G = input_grads(model, X0, y, loss)
    norms = img_norm(G, s_star)
    if q == 1:
        r = torch.full_like(norms, delta)
    else:
        ups = float(norms.pow(2).mean().pow(0.5))
        r = norms * (delta / ups) if ups > 0 else torch.full_like(norms, delta)
    alpha = (r * (ratio / itr)).reshape(-1, 1, 1, 1)
    rr = r.reshape(-1, 1, 1, 1)
    X = X0.clone()
    acc_min, loss_max, X_adv = 1.0, -math.inf, X0.clone()
    curve = []
    n = X0.shape[0]
    for t in range(itr):
        if t > 0:
            G = input_grads(model, X, y, loss)
        if s == "inf":
            X = torch.min(torch.max(X + alpha * torch.sign(G), X0 - rr), X0 + rr).clamp(0, 1)
        else:
            gn = img_norm(G, 2).reshape(-1, 1, 1, 1) + EPS_ATTACK
            dlt = X + alpha * (G / gn) - X0
            dn = img_norm(dlt, 2).reshape(-1, 1, 1, 1) + EPS_ATTACK
            X = (X0 + dlt * (rr / dn).clamp(max=1.0)).clamp(0, 1)
        c, l, _ = evaluate(model, X, y, loss)
        curve.append((c, l))
        if c / n < acc_min:
            acc_min, X_adv = c / n, X.clone()
        loss_max = max(loss_max, l)
    return X_adv, acc_min, loss_max, curve, r


# ---------------------------------------------------------------- W-DRO TRADES (spec §4)


def trades_inner_r1(model, x, y, noise, delta, K, s, ups_ref, budget_loss="ce"):
    """R1a: radii δ_i = δ‖∇CE_i‖_{s*}/Υ_ref, then TRADES' inner PGD inside each ball."""
    model.eval()
    s_star = 1 if s == "inf" else 2
    xg = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(LOSSES[budget_loss](model(xg), y).sum(), [xg])
    r = img_norm(g, s_star) * (delta / ups_ref)
    rr = r.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        z_nat = model(x)
    alpha = rr * (0.007 / 0.031) if s == "inf" else rr * (2.0 / K)
    x_adv = x + noise * 0.001
    for _ in range(K):
        xa = x_adv.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(kl_sum(model(xa), z_nat), [xa])
        with torch.no_grad():
            if s == "inf":
                x_adv = torch.min(torch.max(xa + alpha * torch.sign(g), x - rr), x + rr).clamp(0, 1)
            else:
                gn = img_norm(g, 2).reshape(-1, 1, 1, 1) + EPS_ATTACK
                dlt = xa + alpha * (g / gn) - x
                dn = img_norm(dlt, 2).reshape(-1, 1, 1, 1) + EPS_ATTACK
                x_adv = (x + dlt * (rr / dn).clamp(max=1.0)).clamp(0, 1)
    return x_adv.detach(), r


def trades_inner_r2(model, x, noise, q, s, delta, K):
    """R2: K iterations of batch-level W-PGD on per-sample KL, ball/scale projections."""
    model.eval()
    with torch.no_grad():
        z_nat = model(x)
    step = RATIO * delta / K
    x_adv = x + noise * 0.001
    for _ in range(K):
        xa = x_adv.detach().clone().requires_grad_(True)
        kl_i = F.kl_div(F.log_softmax(model(xa), dim=1), F.softmax(z_nat, dim=1), reduction="none").sum(1)
        (g,) = torch.autograd.grad(kl_i.sum(), [xa])
        with torch.no_grad():
            moved = xa + step * direction(g, q, s)
            x_adv = project(moved, x, q, s, delta, "ball", "scale").clamp(0, 1)
    return x_adv.detach()


class ManualSGD:
    """torch.optim.SGD's rule (momentum, weight decay, dampening 0), written out."""

    def __init__(self, params, lr, momentum, wd):
        self.params, self.lr, self.m, self.wd = list(params), lr, momentum, wd
        self.bufs = [None] * len(self.params)

    def step(self):
        with torch.no_grad():
            for i, p in enumerate(self.params):
                d = p.grad + p * self.wd
                self.bufs[i] = d.clone() if self.bufs[i] is None else self.bufs[i] * self.m + d
                p.sub_(self.bufs[i] * self.lr)


def trades_step(model, opt, x, y, x_adv, beta):
    """Outer TRADES loss in train mode, three forward passes: f(x) for CE, f(x'), f(x) in KL."""
    model.train()
    for p in opt.params:
        p.grad = None
    b = x.shape[0]
    logits = model(x)
    loss_nat = F.cross_entropy(logits, y)
    loss_rob = kl_sum(model(x_adv), model(x)) * (1.0 / b)
    loss = loss_nat + loss_rob * beta
    loss.backward()
    opt.step()
    return float(loss.detach()), float(loss_nat.detach()), float(loss_rob.detach())


# ---------------------------------------------------------------- main


def pretrain(model, X, y):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for epoch in range(3):
        perm = torch.randperm(X.shape[0])
        for s in range(0, X.shape[0], 64):
            idx = perm[s : s + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    # Re-estimate the BatchNorm statistics as a cumulative average over the training images, so
    # eval mode is as accurate as train mode (the running averages lag a fast-moving tiny net).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for s in range(0, X.shape[0], 500):
            model(X[s : s + 500])
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    model.eval()


def sorted_params(model):
    return [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0])]


def main():
    os.makedirs(OUT, exist_ok=True)
    tr_x = read_idx(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"))[:12000]
    tr_y = read_idx(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz"))[:12000]
    te_x = read_idx(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))[:N_TEST]
    te_y = read_idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))[:N_TEST]
    Xtr = torch.from_numpy(tr_x.copy()).float().div(255).unsqueeze(1)
    ytr = torch.from_numpy(tr_y.astype(np.int64))
    images_u8 = torch.from_numpy(te_x.copy()).unsqueeze(1).contiguous()
    labels = torch.from_numpy(te_y.astype(np.int64))
    X0 = images_u8.float() / 255.0

    torch.manual_seed(0)
    model = TinyNet()
    pretrain(model, Xtr, ytr)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "model.safetensors"))
    save_file({"images": images_u8, "labels": labels}, os.path.join(OUT, "data.safetensors"), metadata={"classes": json.dumps([str(i) for i in range(10)])})

    tensors, meta = {}, {"n": N_TEST, "batch_size": BATCH, "itr": ITR, "ratio": RATIO}
    c, l, _ = evaluate(model, X0, labels, "ce")
    meta["clean_correct"] = c
    for loss in LOSSES:
        _, lv, corr = evaluate(model, X0, labels, loss)
        with torch.no_grad():
            z = model(X0)
        per = LOSSES[loss](z, labels)
        wrong = ~corr
        meta[f"clean_{loss}"] = {
            "v0": float(per.double().mean()),
            "w0": float(per[wrong].double().mean()) if wrong.any() else None,
        }

    # Υ
    meta["upsilon"] = {}
    for loss in LOSSES:
        for s_star in (1, 2):
            n, u = upsilon(model, X0, labels, loss, s_star)
            tensors[f"ups.{loss}.s{s_star}"] = n
            meta["upsilon"][f"{loss}.s{s_star}"] = {"q1": u[1], "q2": u[2]}

    deltas = {"inf": 8.0 / 255.0, "2": 0.5}
    meta["deltas"] = deltas

    # W-PGD: 4 (q, s) × {redlr, ce}, plus projection variants; W-FGSM.
    meta["wpgd"] = {}
    cases = [(q, s, loss, "ball", "clip") for q in (1, 2) for s in ("inf", "2") for loss in ("redlr", "ce")]
    cases += [(1, "2", "redlr", "sphere", "clip"), (2, "inf", "redlr", "ball", "scale")]
    for q, s, loss, l2p, lip in cases:
        key = f"q{q}.s{s}.{loss}.{l2p}.{lip}"
        adv, last, acc_min, loss_max, curve = w_pgd(model, X0, labels, q, s, deltas[s], loss, ITR, RATIO, l2p, lip)
        tensors[f"wpgd.{key}.adv"] = adv
        if loss == "redlr":
            tensors[f"wpgd.{key}.last"] = last
        meta["wpgd"][key] = {"acc_min": acc_min, "loss_max": loss_max, "curve": curve}
    meta["wfgsm"] = {}
    for q in (1, 2):
        for s in ("inf", "2"):
            key = f"q{q}.s{s}.redlr"
            adv, _, acc_min, loss_max, curve = w_pgd(model, X0, labels, q, s, deltas[s], "redlr", 1, 1.0)
            tensors[f"wfgsm.{key}.adv"] = adv
            meta["wfgsm"][key] = {"acc_min": acc_min, "loss_max": loss_max}

    # W-PGD-budget R1
    meta["budget"] = {}
    for s in ("inf", "2"):
        key = f"q2.s{s}.redlr"
        adv, acc_min, loss_max, curve, r = w_pgd_budget_r1(model, X0, labels, 2, s, deltas[s], "redlr", ITR, RATIO)
        tensors[f"budget.{key}.adv"] = adv
        tensors[f"budget.{key}.radii"] = r
        meta["budget"][key] = {"acc_min": acc_min, "loss_max": loss_max, "curve": curve}

    # W-DRO TRADES: two R1a steps (ℓ∞, q = 2), Υ_ref from the same 32 images (CE, q = 2).
    tr = {"delta": 8.0 / 255.0, "K": 3, "beta": 6.0, "lr": 0.01, "momentum": 0.9, "wd": 5e-4}
    _, u = upsilon(model, X0, labels, "ce", 1)
    tr["ups_ref"] = u[2]
    tmodel = TinyNet()
    tmodel.load_state_dict(state)
    opt = ManualSGD(sorted_params(tmodel), tr["lr"], tr["momentum"], tr["wd"])
    g = torch.Generator().manual_seed(1234)
    steps = []
    for k in range(2):
        noise = torch.randn(X0.shape, generator=g)
        tensors[f"trades.r1a.noise{k}"] = noise
        x_adv, r = trades_inner_r1(tmodel, X0, labels, noise, tr["delta"], tr["K"], "inf", tr["ups_ref"])
        tensors[f"trades.r1a.xadv{k}"] = x_adv
        tensors[f"trades.r1a.radii{k}"] = r
        lo, ln, lr_ = trades_step(tmodel, opt, X0, labels, x_adv, tr["beta"])
        steps.append({"loss": lo, "loss_nat": ln, "loss_rob": lr_})
    for name, t in tmodel.state_dict().items():
        tensors[f"trades.r1a.after.{name}"] = t.detach().clone()
    tr["r1a_steps"] = steps
    # One R2 step (ℓ2, q = 2).
    tmodel = TinyNet()
    tmodel.load_state_dict(state)
    opt = ManualSGD(sorted_params(tmodel), tr["lr"], tr["momentum"], tr["wd"])
    noise = torch.randn(X0.shape, generator=g)
    tensors["trades.r2.noise"] = noise
    x_adv = trades_inner_r2(tmodel, X0, noise, 2, "2", 0.5, tr["K"])
    tensors["trades.r2.xadv"] = x_adv
    lo, ln, lr_ = trades_step(tmodel, opt, X0, labels, x_adv, tr["beta"])
    tr["r2_step"] = {"loss": lo, "loss_nat": ln, "loss_rob": lr_}
    for name, t in tmodel.state_dict().items():
        tensors[f"trades.r2.after.{name}"] = t.detach().clone()
    meta["trades"] = tr

    # Variant A: PyTorch's Linear re-init after manual_seed(0).
    fc = nn.Linear(32, 10)
    torch.manual_seed(0)
    fc.reset_parameters()
    tensors["variant_a.fc.weight"] = fc.weight.detach().clone()
    tensors["variant_a.fc.bias"] = fc.bias.detach().clone()

    # Cross-check of the manual SGD against torch.optim.SGD (same rule, FMA aside).
    m1, m2 = TinyNet(), TinyNet()
    m1.load_state_dict(state)
    m2.load_state_dict(state)
    o1 = ManualSGD(sorted_params(m1), 0.01, 0.9, 5e-4)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            m.train()
            for p in m.parameters():
                p.grad = None
            F.cross_entropy(m(X0), labels).backward()
            o.step()
    diff = max(float((a - b).abs().max()) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()) if a.is_floating_point())
    meta["manual_sgd_vs_torch_max_abs"] = diff
    assert diff < 1e-6, diff

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(OUT, "expected.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    print(f"clean correct {meta['clean_correct']}/{N_TEST}; wrote {len(tensors)} tensors to {OUT}")
    for k, v in meta["wpgd"].items():
        print(f"  W-PGD {k}: acc_min {v['acc_min']:.4f} loss_max {v['loss_max']:.4f}")


# ---------------------------------------------------------------- benchmark (bench/ml_bench.sh)


class _Block(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(i), nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(o), nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.equal = i == o
        if not self.equal:
            self.convShortcut = nn.Conv2d(i, o, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return (x if self.equal else self.convShortcut(a)) + h


class _Group(nn.Module):
    def __init__(self, n, i, o, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_Block(i if k == 0 else o, o, stride if k == 0 else 1) for k in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """RobustBench wide_resnet.py (spec §7.3), no sub_block1, no normalisation."""

    def __init__(self, depth=16, widen=4):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = _Group(n, c[0], c[1], 1), _Group(n, c[1], c[2], 2), _Group(n, c[2], c[3], 2)
        self.bn1, self.fc = nn.BatchNorm2d(c[3]), nn.Linear(c[3], 10)

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.avg_pool2d(F.relu(self.bn1(h)), 8).flatten(1))


def bench_setup(d):
    """Random WRN-16-4 (seed 0) and 512 random CIFAR-sized images, shared with the Rust bench."""
    os.makedirs(d, exist_ok=True)
    torch.manual_seed(0)
    m = WideResNet(16, 4)
    save_file({k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}, os.path.join(d, "model.safetensors"))
    x, y = torch.rand(512, 3, 32, 32), torch.randint(0, 10, (512,))
    m.eval()
    with torch.no_grad():
        z = m(x[:8])
    save_file({"images": x, "labels": y, "logits8": z}, os.path.join(d, "data.safetensors"))


def bench(which, d, batch, itr, repeats):
    """Prints one JSON line: per-iteration (W-PGD) or per-step (TRADES) seconds, min over repeats."""
    global BATCH
    import time
    from safetensors.torch import load_file

    BATCH = batch
    m = WideResNet(16, 4)
    m.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
    data = load_file(os.path.join(d, "data.safetensors"))
    x, y = data["images"], data["labels"]
    times = []
    if which == "wpgd":
        w_pgd(m, x[:64], y[:64], 2, "inf", 8 / 255, "redlr", 1, RATIO)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            w_pgd(m, x, y, 2, "inf", 8 / 255, "redlr", itr, RATIO)
            times.append((time.perf_counter() - t) / itr)
    else:
        xb, yb = x[:128], y[:128]
        _, u = upsilon(m, xb, yb, "ce", 1)
        opt = ManualSGD(sorted_params(m), 0.01, 0.9, 5e-4)
        g = torch.Generator().manual_seed(0)
        for k in range(repeats + 1):
            noise = torch.randn(xb.shape, generator=g)
            t = time.perf_counter()
            x_adv, _ = trades_inner_r1(m, xb, yb, noise, 8 / 255, 10, "inf", u[2])
            trades_step(m, opt, xb, yb, x_adv, 6.0)
            if k > 0:
                times.append(time.perf_counter() - t)
    print(json.dumps({"impl": "pytorch", "bench": which, "seconds": min(times), "all": times, "threads": torch.get_num_threads(), "batch_size": batch}))


def cli():
    if len(sys.argv) >= 3 and sys.argv[1] == "bench-setup":
        return bench_setup(sys.argv[2])
    if len(sys.argv) >= 4 and sys.argv[1] == "bench":
        kw = dict(a.split("=", 1) for a in sys.argv[4:])
        return bench(sys.argv[2], sys.argv[3], int(kw.get("batch", 128)), int(kw.get("itr", 5)), int(kw.get("repeats", 3)))
    return main()


if __name__ == "__main__":
    sys.exit(cli())
