"""Head losses and logit adjustment: one loss for both strategies, aware of single-valued fields.

``HeadLoss(groups, kind)``: softmax cross-entropy over each group's tags (images with no value in a field
contribute nothing to it) plus the per-tag loss ``kind`` (BCE, class-balanced BCE, ASL) on the free tags,
averaged over images and, for the BCE kinds, over decision units (groups + free tags; ASL is summed, as
its authors do). With no groups it is exactly
:class:`train.losses.MultiLabelLoss`. Logits may carry leading axes (the probe trains S heads at once:
``S x B x T``); the loss is then one value per leading index.

Logit adjustment (Menon et al. 2021, post-hoc form): subtract ``tau * log(prior)`` from each group's logits,
where ``prior`` is the tag's share of its field in the training split; tau is selected on validation and
folded into the head's bias, so every runtime applies it for free.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bakeoff.train.losses import MultiLabelLoss, asymmetric_elementwise

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


class HeadLoss(torch.nn.Module):
    """``loss(logits[..., B, T], targets[B, T])`` -> a scalar per leading index (a scalar for 2-D logits)."""

    def __init__(self, groups: Sequence[Sequence[int]] = (), kind: str = "bce", pos_weight: torch.Tensor | None = None,
                 n_tags: int | None = None):
        super().__init__()
        self.plain = MultiLabelLoss(kind, pos_weight)  # validates kind / pos_weight
        self.kind = kind
        self.groups = [list(map(int, g)) for g in groups]
        grouped = {j for g in self.groups for j in g}
        if self.groups and n_tags is None:
            raise ValueError("HeadLoss with groups needs n_tags")
        free = [j for j in range(n_tags or 0) if j not in grouped]
        self.register_buffer("free", torch.tensor(free, dtype=torch.long))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits.float(), targets.float()
        if not self.groups:
            if logits.dim() == 2:
                return self.plain(logits, targets)
            return torch.stack([self.plain(z, targets) for z in logits.reshape(-1, *logits.shape[-2:])]).view(
                logits.shape[:-2])
        total = torch.zeros(logits.shape[:-1], device=logits.device)  # [..., B]
        for g in self.groups:
            yg = targets[:, g]
            has = yg.sum(1) > 0
            ce = torch.logsumexp(logits[..., g], dim=-1) - (logits[..., g] * yg).sum(-1)
            total = total + torch.where(has, ce, torch.zeros_like(ce))
        if self.free.numel():
            total = total + self._elementwise(logits[..., self.free], targets[:, self.free]).sum(-1)
        # BCE kinds average over decision units (as MultiLabelLoss averages over tags); ASL sums, as it does
        return total.mean(-1) / (1 if self.kind == "asl" else len(self.groups) + self.free.numel())

    def _elementwise(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "asl":
            return asymmetric_elementwise(z, y.expand_as(z))
        pw = self.plain.pos_weight[self.free] if self.plain.pos_weight is not None else None
        return F.binary_cross_entropy_with_logits(z, y.expand_as(z), pos_weight=pw, reduction="none")


def tag_scores(logits: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """``Decision.scores`` in torch: softmax within each group, sigmoid elsewhere. Selection by AP must see
    group tags this way: a softmax leaves each image's per-group shift free, so raw logits do not rank images."""
    z = logits.float()
    out = torch.sigmoid(z)
    for g in groups:
        out[..., list(g)] = torch.softmax(z[..., list(g)], dim=-1)
    return out


def group_log_prior(train_counts: np.ndarray, groups: Sequence[Sequence[int]], n_tags: int) -> np.ndarray:
    """log share of each group tag within its field in the training split (add-one smoothed); 0 elsewhere."""
    out = np.zeros(n_tags)
    counts = np.asarray(train_counts, dtype=np.float64)
    for g in groups:
        c = counts[list(g)] + 1.0
        out[list(g)] = np.log(c / c.sum())
    return out


def adjusted(logits: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """Logit-adjusted logits: ``z - tau * log_prior`` (only group tags have a non-zero log prior)."""
    return np.asarray(logits, dtype=np.float64) - tau * log_prior


def initial_bias(y_train: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Bias that starts each tag at its training frequency: log-odds for free tags, log share in groups."""
    y = np.asarray(y_train, dtype=np.float64)
    p = np.clip(y.mean(0) if len(y) else np.full(y.shape[1], 0.5), 1e-4, 1 - 1e-4)
    in_group = np.zeros(y.shape[1], dtype=bool)
    for g in groups:
        in_group[list(g)] = True
    return np.where(in_group, group_log_prior(y.sum(0), groups, y.shape[1]), np.log(p / (1 - p)))
