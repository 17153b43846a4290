"""Strategy 1: a linear head on frozen, cached features.

All sweep settings (learning rate x weight decay) are trained at once as one batched head (S x D x T),
mini-batch AdamW on standardised features, each setting keeping its best-validation-mAP epoch; the
setting with the best validation mAP wins (the test split is never looked at). The standardisation is
folded into the returned ``nn.Linear`` so it applies to raw backbone features.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from train.device import autocast
from train.losses import MultiLabelLoss
from train.valmetrics import macro_ap


@dataclass
class ProbeConfig:
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    epochs: int = 20
    batch_size: int = 1024
    eval_every: int = 3
    loss: str = "bce"
    amp: bool = True  # bf16 matmuls (CPU and GPU); weights, loss and optimiser stay fp32
    seed: int = 0

    def grid(self) -> list[tuple[float, float]]:
        return list(itertools.product(self.lrs, self.weight_decays))


@dataclass
class ProbeResult:
    head: nn.Linear
    best: dict  # the chosen setting, its epoch and val mAP
    sweep: list[dict] = field(default_factory=list)  # every setting's best val mAP
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _BatchedAdam:
    """Adam over parameters whose first axis indexes the sweep setting, each with its own learning rate."""

    def __init__(self, params: list[torch.Tensor], lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.betas, self.eps, self.t = params, betas, eps, 0
        self.lrs = torch.tensor(lrs, device=params[0].device)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        b1, b2 = self.betas
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            update = (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps)
            p.sub_(update * (scale * self.lrs).view(-1, *[1] * (p.dim() - 1)))


def _as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)


def train_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                cfg: ProbeConfig = ProbeConfig(), loss: MultiLabelLoss | None = None,
                device: torch.device | str = "cpu") -> ProbeResult:
    """Fit the sweep of linear heads; return the best one (as a Linear on raw features) and the sweep."""
    t0 = time.perf_counter()
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    xt, yt = _as_tensor(x_train, device), _as_tensor(y_train, device)
    xv = _as_tensor(x_val, device)
    mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-6)
    xt, xv = (xt - mu) / sd, (xv - mu) / sd
    n, d = xt.shape
    t = yt.shape[1]
    settings = cfg.grid()
    s = len(settings)
    weight = nn.Parameter(torch.zeros(s, d, t, device=device))
    # bias init at the log-odds of each tag's training frequency: rare tags start "off"
    prior = yt.mean(0).clamp(1e-4, 1 - 1e-4)
    bias = nn.Parameter(torch.log(prior / (1 - prior)).repeat(s, 1).contiguous())
    opt = _BatchedAdam([weight, bias], lrs=[lr for lr, _ in settings])
    wds = torch.tensor([wd for _, wd in settings], device=device)
    loss_fn = (loss or MultiLabelLoss(cfg.loss)).to(device)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    best_map = np.full(s, -1.0)
    best_epoch = np.zeros(s, dtype=int)
    best_w, best_b = weight.detach().clone(), bias.detach().clone()
    history, step = [], 0
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=g).to(device)
        for k in range(steps_per_epoch):
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            with autocast(device, cfg.amp):
                logits = torch.einsum("bd,sdt->sbt", xt[idx], weight).float() + bias[:, None, :]
            per_setting = torch.stack([loss_fn(logits[j], yt[idx]) for j in range(s)])
            # L2 on the weights, scaled per tag so that wd reads like logistic regression's 1/(C n)
            l2 = 0.5 * wds * weight.pow(2).sum(dim=(1, 2)) / t
            weight.grad = bias.grad = None
            (per_setting + l2).sum().backward()
            opt.step(0.5 * (1 + math.cos(math.pi * step / total)))  # cosine schedule
            step += 1
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            with torch.no_grad():
                val_logits = torch.einsum("bd,sdt->sbt", xv, weight) + bias[:, None, :]
            maps = np.array([macro_ap(y_val, val_logits[j].float().cpu().numpy()) for j in range(s)])
            better = maps > best_map
            best_map[better], best_epoch[better] = maps[better], epoch
            bt = torch.as_tensor(better, device=device)
            best_w[bt], best_b[bt] = weight.detach()[bt], bias.detach()[bt]
            history.append({"epoch": epoch, "train_loss": float(per_setting.detach().mean()),
                            "val_map": {f"lr={lr:g},wd={wd:g}": float(m) for (lr, wd), m in zip(settings, maps)}})
    j = int(np.argmax(best_map))
    head = nn.Linear(d, t)
    with torch.no_grad():  # fold the standardisation in: w' = w / sd, b' = b - (mu / sd) @ w
        w = best_w[j] / sd[:, None]
        head.weight.copy_(w.T.cpu())
        head.bias.copy_((best_b[j] - mu @ w).cpu())
    sweep = [{"lr": lr, "weight_decay": wd, "val_map": float(m), "epoch": int(e)}
             for (lr, wd), m, e in zip(settings, best_map, best_epoch)]
    best = {**sweep[j], "selected_by": "validation macro mAP"}
    return ProbeResult(head, best, sweep, history, time.perf_counter() - t0)
