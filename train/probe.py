"""Strategy 1: a linear head on frozen, cached features.

The regularisation sweep is one batched problem: S heads (one per weight decay on a wide log grid) share
every mini-batch of standardised features (``S x D x T`` weights, bf16 matmuls), trained with AdamW's
*decoupled* weight decay (Loshchilov & Hutter 2019: the decay is not rescaled by Adam's moments, so the grid
orders the heads from barely to strongly shrunk, as logistic regression's lambda does) and a cosine schedule.
Each head keeps its best-validation-mAP epoch; the head with the best validation mAP wins, and whether it sits
on the grid's edge is recorded (widen the grid if so). The test split is never looked at. The loss is
:class:`train.heads.HeadLoss` (softmax per single-valued field, per-tag loss elsewhere). The
standardisation is folded into the returned ``nn.Linear`` so it applies to raw backbone features.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from train.device import autocast
from train.heads import HeadLoss, initial_bias, tag_scores
from train.valmetrics import batched_macro_ap


def log_grid(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """``n`` values evenly spaced in log between ``lo`` and ``hi`` (3 significant digits)."""
    if n == 1:
        return (float(f"{math.sqrt(lo * hi):.3g}"),)
    return tuple(float(f"{v:.3g}") for v in np.geomspace(lo, hi, n))


DECAY_RANGE = (1e-3, 30.0)  # the weight-decay grid spans these, log-spaced: from no visible shrinkage to too much


@dataclass
class ProbeConfig:
    weight_decays: tuple[float, ...] = log_grid(*DECAY_RANGE, 8)  # decoupled (AdamW) decay per unit lr
    lr: float = 2e-3
    epochs: int = 12
    batch_size: int = 1024
    eval_every: int = 2
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


class _BatchedAdamW:
    """AdamW over parameters whose first axis indexes the sweep setting, each with its own decoupled decay."""

    def __init__(self, params: list[torch.Tensor], decays: list[torch.Tensor | None], lr: float,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.decays, self.lr, self.betas, self.eps, self.t = params, decays, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        b1, b2 = self.betas
        self.t += 1
        lr = self.lr * scale
        for p, wd, m, v in zip(self.params, self.decays, self.m, self.v):
            if wd is not None:
                p.mul_(1 - lr * wd.view(-1, *[1] * (p.dim() - 1)))
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps), value=-lr / (1 - b1 ** self.t))


def _as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)


def train_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                cfg: ProbeConfig = ProbeConfig(), loss: HeadLoss | None = None,
                device: torch.device | str = "cpu", progress: bool = False) -> ProbeResult:
    """Fit the sweep of linear heads; return the best one (as a Linear on raw features) and the sweep."""
    t0 = time.perf_counter()
    device = torch.device(device)
    loss_fn = (loss or HeadLoss()).to(device)
    groups = loss_fn.groups
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    xt, yt = _as_tensor(x_train, device), _as_tensor(y_train, device)
    xv, yv = _as_tensor(x_val, device), torch.as_tensor(np.asarray(y_val), device=device)
    mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-6)
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    n, d = xt.shape
    t = yt.shape[1]
    decays = cfg.grid()
    s = len(decays)
    weight = nn.Parameter(torch.zeros(s, d, t, device=device))
    bias = nn.Parameter(torch.as_tensor(initial_bias(y_train, groups), dtype=torch.float32,
                                        device=device).repeat(s, 1).contiguous())
    opt = _BatchedAdamW([weight, bias], [torch.tensor(decays, device=device), None], cfg.lr)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    best_map = np.full(s, -1.0)
    best_epoch = np.zeros(s, dtype=int)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    history, step = [], 0
    for epoch in tqdm(range(1, cfg.epochs + 1), desc=f"probe sweep ({s} weight decays)", unit="epoch",
                      disable=not progress, leave=False):
        perm = torch.randperm(n, generator=g).to(device)
        losses = []
        for k in range(steps_per_epoch):
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            with autocast(device, cfg.amp):
                logits = torch.matmul(xt[idx], weight).float() + bias[:, None, :]
            per_setting = loss_fn(logits, yt[idx])
            weight.grad = bias.grad = None
            per_setting.sum().backward()
            opt.step(0.5 * (1 + math.cos(math.pi * step / total)))  # cosine schedule
            step += 1
            losses.append(per_setting.detach())
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            with torch.no_grad():  # fp32: bf16 logits tie often enough to move AP by the gaps between decays
                val_logits = torch.matmul(xv, weight) + bias[:, None, :]
            maps = batched_macro_ap(yv, tag_scores(val_logits, groups))
            better = maps > best_map
            best_map[better], best_epoch[better] = maps[better], epoch
            bt = torch.as_tensor(better, device=device)
            best_w[bt], best_b[bt] = weight.detach()[bt], bias.detach()[bt]
            history.append({"epoch": epoch, "train_loss": float(torch.stack(losses).mean()),
                            "val_map": {f"wd={wd:g}": float(m) for wd, m in zip(decays, maps)}})
    j = int(np.argmax(best_map))
    head = nn.Linear(d, t)
    with torch.no_grad():  # fold the standardisation in: w' = w / sd, b' = b - (mu / sd) @ w
        w = best_w[j] / sd[:, None]
        head.weight.copy_(w.T.cpu())
        head.bias.copy_((best_b[j] - mu @ w).cpu())
    sweep = [{"lr": cfg.lr, "weight_decay": wd, "val_map": float(m), "epoch": int(e)}
             for wd, m, e in zip(decays, best_map, best_epoch)]
    best = {**sweep[j], "selected_by": "validation macro mAP", "trials": s,
            "on_grid_edge": bool(s > 2 and j in (0, s - 1))}
    return ProbeResult(head, best, sweep, history, time.perf_counter() - t0)
