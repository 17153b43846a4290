"""Validation metrics used for model selection during training (the evaluate stage has the full set)."""
from __future__ import annotations

import warnings

import numpy as np
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
