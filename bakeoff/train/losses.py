"""Multi-label losses: BCE, class-balanced BCE, and ASL (Ridnik et al. 2021)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("bce", "balanced", "asl")


def class_balanced_pos_weight(train_counts: np.ndarray, n_train: int, max_weight: float = 50.0) -> torch.Tensor:
    """pos_weight = negatives / positives per tag, capped: rare tags weigh more (class-balanced BCE)."""
    pos = np.maximum(np.asarray(train_counts, dtype=np.float64), 1.0)
    return torch.tensor(np.minimum((n_train - pos) / pos, max_weight), dtype=torch.float32)


def asymmetric_elementwise(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0,
                           gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """ASL per (image, tag) element with the official defaults."""
    p = torch.sigmoid(logits.float())
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = targets * torch.log(p.clamp(min=eps)) * (1 - p) ** gamma_pos
    loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=eps)) * p_neg ** gamma_neg
    return -(loss_pos + loss_neg)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, **kw) -> torch.Tensor:
    """ASL summed over tags and averaged over the batch (the official loss is summed over the batch too:
    averaging keeps the learning rate batch-size free)."""
    return asymmetric_elementwise(logits, targets, **kw).sum(1).mean()


class MultiLabelLoss(torch.nn.Module):
    """``loss(logits, targets)`` for the chosen kind; BCE variants average over tags and images."""

    def __init__(self, kind: str = "bce", pos_weight: torch.Tensor | None = None):
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")
        if kind == "balanced" and pos_weight is None:
            raise ValueError("loss 'balanced' needs pos_weight (class_balanced_pos_weight)")
        self.kind = kind
        self.register_buffer("pos_weight", pos_weight if kind == "balanced" else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "asl":
            return asymmetric_loss(logits, targets)
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=self.pos_weight)
