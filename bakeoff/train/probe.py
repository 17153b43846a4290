"""Strategy 1: a linear head on frozen, cached features.

The regularisation sweep is one batched problem: S heads (one per weight decay on a wide log grid) share
every mini-batch of the standardised features, held once in bf16. Their weights are one ``D x (S*T)`` matrix,
so a step is two bf16 GEMMs (the logits, the weight gradient) and the loss, whose gradient :class:`_SweepLoss`
writes out. They are trained with AdamW's *decoupled* weight decay (Loshchilov & Hutter 2019: the decay is not
rescaled by Adam's moments, so the grid orders the heads from barely to strongly shrunk, as logistic
regression's lambda does) and a cosine schedule: 6 epochs at lr 5e-3 came within 0.002 of the validation mAP
that 12 at 2e-3 reached on the fashion catalog's CNN features, above it on DINOv2's, in under a quarter of
the time (``bench/probe_bench.py``). Validation runs every ``eval_every`` epochs and at the last; each head
keeps its best epoch, the head with the best validation mAP wins, and whether it sits on the grid's edge is
recorded (widen the grid if so). The test split is never looked at. The loss is :class:`train.heads.HeadLoss`
(softmax per single-valued field, per-tag loss elsewhere); :class:`_SweepLoss` computes the same value and
gradient faster, and its value is checked against HeadLoss's on the first batch. The standardisation is
folded into the returned ``nn.Linear`` so it applies to raw backbone features.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from bakeoff.train.heads import HeadLoss, initial_bias, tag_scores
from bakeoff.train.losses import asymmetric_elementwise
from bakeoff.train.valmetrics import batched_macro_ap


def log_grid(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """``n`` values evenly spaced in log between ``lo`` and ``hi`` (3 significant digits)."""
    if n == 1:
        return (float(f"{math.sqrt(lo * hi):.3g}"),)
    return tuple(float(f"{v:.3g}") for v in np.geomspace(lo, hi, n))


DECAY_RANGE = (1e-3, 30.0)  # the weight-decay grid spans these, log-spaced: from no visible shrinkage to too much


@dataclass
class ProbeConfig:
    weight_decays: tuple[float, ...] = log_grid(*DECAY_RANGE, 8)  # decoupled (AdamW) decay per unit lr
    lr: float = 5e-3
    epochs: int = 6
    batch_size: int = 1024
    eval_every: int = 3
    amp: bool = True  # bf16 matmuls (CPU and GPU); weights, loss and optimiser stay fp32
    seed: int = 0

    def grid(self) -> list[float]:
        return list(self.weight_decays)


@dataclass
class ProbeResult:
    head: nn.Linear
    best: dict  # the chosen setting, its epoch and val mAP, and whether it is on the grid's edge
    sweep: list[dict] = field(default_factory=list)  # every setting's best val mAP
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _SweepLoss:
    """:class:`HeadLoss` for S heads at once, on logits laid out for it, with its gradient written out.

    Layout: the tags are put in :attr:`order`, each group a contiguous block and then the free tags, and a
    batch's S x T logits are one (S*T) x B matrix, block by block: order positions a..e of every setting are
    rows S*a..S*e, an S x (e-a) x B array; :attr:`rows` maps (setting, tag) to its row. Each group's softmax
    runs on contiguous memory (HeadLoss picks a group with a list index, whose backward fills a zero copy of
    all the logits per group). The gradient is softmax minus target in a group (zero for an image with no value
    in the field) and ``(1 + (pw - 1) y) sigmoid(z) - pw y`` for a free tag's BCE; ASL's goes through autograd.
    The value, needed only for the history, is computed apart, its target terms at the targets alone.
    """

    def __init__(self, loss: HeadLoss, n_tags: int, n_settings: int, grad_dtype: torch.dtype = torch.float32):
        grouped = [j for g in loss.groups for j in g]
        free = sorted(set(range(n_tags)) - set(grouped))
        device = loss.free.device
        self.order = torch.tensor(grouped + free, dtype=torch.long, device=device)
        ends = np.cumsum([len(g) for g in loss.groups] + ([len(free)] if free else [])).tolist()
        self.blocks = list(zip([0, *ends[:-1]], ends))
        self.n_grouped, self.settings = len(grouped), torch.arange(n_settings, device=device)[:, None]
        self.row0 = torch.empty(n_tags, dtype=torch.long, device=device)  # per order position: setting 0's row
        self.stride = torch.empty(n_tags, dtype=torch.long, device=device)  # and the step to the next setting's
        for a, e in self.blocks:
            self.row0[a:e] = n_settings * a + torch.arange(e - a, device=device)
            self.stride[a:e] = e - a
        self.rows = torch.empty(n_settings, n_tags, dtype=torch.long, device=device)
        self.rows[:, self.order] = self.row0 + self.stride * self.settings  # rows[s, t]: setting s, tag t
        self.kind, self.grad_dtype = loss.kind, grad_dtype
        pw = loss.plain.pos_weight  # per order position; 1 in the groups, whose target term is BCE's with pw 1
        self.pos_weight = torch.ones(n_tags, 1, device=device)
        if pw is not None:
            self.pos_weight[self.n_grouped:, 0] = pw[torch.tensor(free, dtype=torch.long, device=pw.device)]
        self.units = 1 if loss.kind == "asl" else len(loss.groups) + len(free)

    def lay_out(self, values: torch.Tensor) -> torch.Tensor:
        """S x T values (or broadcast to it) as one (S*T)-long vector in the layout."""
        out = torch.empty(self.rows.numel(), dtype=values.dtype, device=self.rows.device)
        out[self.rows] = values.to(out.device)
        return out

    def _blocks(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The B x T targets ``y`` as T x B in order, and per block (a, e, its S x (e-a) x B logits, targets)."""
        s, b = len(self.settings), z.shape[1]
        y = y[:, self.order].T.to(z.dtype)
        return y, [(a, e, z[s * a:s * e].view(s, e - a, b), y[a:e]) for a, e in self.blocks]

    def gradient(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d(loss summed over the settings) / d``z`` (in the layout, ``grad_dtype``); ``z``: (S*T) x B fp32 logits
        in the layout, ``y``: B x T targets."""
        scale = 1 / (self.units * z.shape[1])  # the loss averages over images and decision units
        grad = torch.empty_like(z, dtype=self.grad_dtype)
        _, blocks = self._blocks(z, y)
        s = len(self.settings)
        for a, e, zb, yb in blocks:
            gb = grad[s * a:s * e].view(zb.shape)
            if a < self.n_grouped:  # softmax minus target, for images with a value in the field
                torch.addcmul(yb * -scale, torch.softmax(zb, 1), (yb.sum(0) > 0).to(zb.dtype), value=scale, out=gb)
            elif self.kind == "asl":
                zb = zb.detach().requires_grad_()
                gb.copy_(torch.autograd.grad(asymmetric_elementwise(zb, yb.expand_as(zb)).sum(), zb)[0].mul_(scale))
            else:
                pw = self.pos_weight[a:e]
                torch.addcmul(yb * (-scale * pw), torch.sigmoid(zb), 1 + (pw - 1) * yb, value=scale, out=gb)
        return grad

    def value(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss per setting (S), as HeadLoss gives it on these logits."""
        y, blocks = self._blocks(z, y)
        total = z.new_zeros(len(self.settings), z.shape[1])
        for a, _, zb, yb in blocks:
            if a < self.n_grouped:  # cross-entropy: logsumexp(z) - z . y, for images with a value in the field
                total += torch.logsumexp(zb, 1) * (yb.sum(0) > 0)
            elif self.kind == "asl":
                total += asymmetric_elementwise(zb, yb.expand_as(zb)).sum(1)
            else:  # BCE: (1 + (pw - 1) y) softplus(z) - pw y z; its terms in y below
                total += _softplus(zb).sum(1)
        pos, img = y.nonzero(as_tuple=True)  # the terms in y, read at the targets
        z_pos = z[self.row0[pos] + self.stride[pos] * self.settings, img]  # S x P
        if self.kind == "asl":
            term = -z_pos * (pos < self.n_grouped)  # ASL's free tags are all in the loop's total
        else:
            term = (self.pos_weight[pos, 0] - 1) * _softplus(-z_pos) - z_pos
        total.index_add_(1, img, term * y[pos, img])
        return total.mean(1) / self.units


def _softplus(z: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(z))`` from vectorised kernels (``log1p``, and so ``F.softplus``, is not on CPU: 20x slower)."""
    return torch.relu(z) - torch.log(torch.sigmoid(z.abs()))


class _AdamW:
    """AdamW whose decoupled weight decay differs along the last axis (the sweep's columns). torch.optim's
    optimisers import torch._dynamo on first use, about a second here."""

    def __init__(self, params: list[torch.Tensor], decays: list[torch.Tensor | None],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.decays, self.betas, self.eps, self.t = params, decays, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        b1, b2 = self.betas
        self.t += 1
        c = math.sqrt(1 - b2 ** self.t)  # m / (sqrt(v / c^2) + eps) = c m / (sqrt(v) + c eps)
        for p, g, wd, m, v in zip(self.params, grads, self.decays, self.m, self.v):
            if wd is not None:
                p.mul_(1 - lr * wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().add_(c * self.eps), value=-lr * c / (1 - b1 ** self.t))


def _as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)


def train_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                cfg: ProbeConfig = ProbeConfig(), loss: HeadLoss | None = None,
                device: torch.device | str = "cpu", progress: bool = False,
                shared_scale: slice | None = None) -> ProbeResult:
    """Fit the sweep of linear heads; return the best one (as a Linear on raw features) and the sweep.

    Each column is centred and scaled to unit variance, except that the columns of ``shared_scale`` (a histogram:
    bins that are rarely non-zero must not be blown up to unit variance) share one scale, the root of their mean
    variance."""
    t0 = time.perf_counter()
    device = torch.device(device)
    loss_fn = (loss or HeadLoss()).to(device)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    xt = torch.tensor(np.asarray(x_train), dtype=torch.float32, device=device)  # a copy: standardised in place
    n, d = xt.shape
    t = np.shape(y_train)[1]
    decays = cfg.grid()
    s = len(decays)
    mm_dtype = torch.bfloat16 if cfg.amp else torch.float32
    sweep_loss = _SweepLoss(loss_fn, t, s, mm_dtype)
    rows = sweep_loss.rows  # every (S*T)-long axis below is in its layout
    mu = xt.mean(0)
    xt.sub_(mu)
    sd = (xt.square().sum(0) / max(n - 1, 1)).sqrt_().clamp_(min=1e-6)  # Tensor.std(0) is 4x slower on CPU
    if shared_scale is not None:
        sd[shared_scale] = sd[shared_scale].square().mean().sqrt()
    xt = xt.div_(sd).to(mm_dtype)
    xv = (_as_tensor(x_val, device) - mu).div_(sd)  # fp32: bf16 logits tie often enough to move AP
    yt = torch.as_tensor(np.asarray(y_train), device=device)
    yv = torch.as_tensor(np.asarray(y_val), device=device)
    weight = torch.zeros(d, s * t, device=device)  # setting k's head: columns rows[k]
    bias = sweep_loss.lay_out(torch.as_tensor(initial_bias(y_train, loss_fn.groups), dtype=torch.float32))
    decay = sweep_loss.lay_out(torch.tensor(decays)[:, None])
    setting = sweep_loss.lay_out(torch.arange(s)[:, None])
    opt = _AdamW([weight, bias], [decay, None])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    best_map = np.full(s, -1.0)
    best_epoch = np.zeros(s, dtype=int)
    best_w, best_b = weight.clone(), bias.clone()
    history, step = [], 0
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=f"probe sweep ({s} weight decays)", unit="epoch",
                      disable=not progress, leave=False):
        perm = torch.randperm(n, generator=g).to(device)
        losses = []
        recorded = epoch % cfg.eval_every == 0 or epoch == cfg.epochs  # its train loss goes into the history
        for k in range(steps_per_epoch):
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            xb, yb = xt[idx], yt[idx]
            z = torch.add(weight.to(mm_dtype).T @ xb.T, bias[:, None])  # fp32 logits, (S*T) x B
            if step == 0:
                _check_against(loss_fn, z[rows].transpose(1, 2), yb, sweep_loss.value(z, yb))
            if recorded:
                losses.append(sweep_loss.value(z, yb))
            grad = sweep_loss.gradient(z, yb)
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine schedule
            opt.step([(xb.T @ grad.T).float(), grad.sum(1, dtype=torch.float32)], lr)
            step += 1
        if recorded:
            val_logits = torch.add(weight.T @ xv.T, bias[:, None])[rows].transpose(1, 2)  # S x N x T
            maps = batched_macro_ap(yv, tag_scores(val_logits, loss_fn.groups))
            better = maps > best_map
            best_map[better], best_epoch[better] = maps[better], epoch
            cols = torch.as_tensor(better, device=device)[setting]
            best_w[:, cols], best_b[cols] = weight[:, cols], bias[cols]
            history.append({"epoch": epoch, "train_loss": float(torch.stack(losses).mean()),
                            "val_map": {f"wd={wd:g}": float(m) for wd, m in zip(decays, maps)}})
    j = int(np.argmax(best_map))
    head = nn.Linear(d, t)
    with torch.no_grad():  # the standardisation folded in: w' = w / sd, b' = b - mu @ w'
        w = best_w[:, rows[j]] / sd[:, None]
        head.weight.copy_(w.T.cpu())
        head.bias.copy_((best_b[rows[j]] - mu @ w).cpu())
    sweep = [{"lr": cfg.lr, "weight_decay": wd, "val_map": float(m), "epoch": int(e)}
             for wd, m, e in zip(decays, best_map, best_epoch)]
    best = {**sweep[j], "selected_by": "validation macro mAP", "trials": s,
            "on_grid_edge": bool(s > 2 and j in (0, s - 1))}
    return ProbeResult(head, best, sweep, history, time.perf_counter() - t0)


def _check_against(loss: HeadLoss, logits: torch.Tensor, y: torch.Tensor, per_setting: torch.Tensor) -> None:
    """Raise unless :class:`_SweepLoss` gave ``per_setting``, what ``loss`` gives on these S x B x T logits."""
    want = loss(logits, y)
    if not torch.allclose(per_setting, want, rtol=1e-4, atol=1e-6):
        raise RuntimeError(f"the probe's sweep loss {per_setting.tolist()} differs from {type(loss).__name__}'s "
                           f"{want.tolist()}: update train.probe._SweepLoss to match it")
