"""Validation metrics used for model selection during training (the evaluate stage has the full set)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.metrics import average_precision_score


def macro_ap(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean average precision over tags with at least one positive (others are undefined, skipped)."""
    keep = np.asarray(y).sum(0) > 0
    if not keep.any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(average_precision_score(np.asarray(y)[:, keep], np.asarray(scores, dtype=np.float64)[:, keep],
                                              average="macro"))


def batched_macro_ap(y: torch.Tensor, scores: torch.Tensor) -> np.ndarray:
    """Macro AP over tags with a positive, for each leading index of ``scores`` (S x N x T), in one sort.

    Tied scores are ranked in index order (a stable sort; sklearn groups ties); on continuous scores they agree.
    """
    y = y.float()
    keep = y.sum(0) > 0
    if not keep.any():
        return np.full(scores.shape[0], np.nan)
    order = torch.argsort(scores[..., keep].float(), dim=-2, descending=True, stable=True)
    hits = torch.gather(y[:, keep].expand(scores.shape[0], -1, -1), -2, order)
    rank = torch.arange(1, hits.shape[-2] + 1, device=hits.device, dtype=torch.float32).view(1, -1, 1)
    ap = (hits * hits.cumsum(-2) / rank).sum(-2) / hits.sum(-2)
    return ap.mean(-1).cpu().numpy().astype(np.float64)
