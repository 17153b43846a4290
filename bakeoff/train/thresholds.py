"""Per-tag decision thresholds that maximise each tag's F1 on the validation split.

Rule: a tag is predicted when ``score >= threshold`` (``evaluate.metrics.binarize`` applies the same rule).
Scores may be probabilities or logits; thresholds are float64 and must stay float64 (a midpoint rounded
to float32 can land on a score).

Exact search (``grid=None``): scores of each tag are sorted once; cumulative sums give tp at every cut
between two distinct scores, and F1 = 2tp / (npos + npred). The chosen threshold is the *midpoint*
between the last predicted and the first unpredicted distinct score (a margin on both sides for unseen
scores), or the lowest score itself when every image is predicted. Equal F1 at several cuts: the highest
threshold (fewest predictions) wins.

Tags with no validation positive get ``default`` (0.5): every threshold gives them F1 = 0 on validation,
so validation carries no information. 0.5 leaves the decision to the model's own probability (a tag that
does occur in test can still be found), whereas ``max score + eps`` would fix recall at 0 for good.
"""
from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5


def _check(y_val: np.ndarray, scores_val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_val)
    s = np.asarray(scores_val, dtype=np.float64)
    if s.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"scores_val: expected a 2-D array shaped like y_val {y.shape}, got {s.shape}")
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("y_val: labels must be 0 or 1")
    bad = ~np.isfinite(s)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ValueError(f"scores_val: {int(bad.sum())} NaN/Inf values (first at row {r}, tag {c})")
    return y.astype(bool), s


def fit_thresholds(y_val: np.ndarray, scores_val: np.ndarray, grid: np.ndarray | None = None,
                   default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per-tag threshold (T,) maximising validation F1; candidates are all cuts, or the ``grid`` values."""
    y, s = _check(y_val, scores_val)
    n, t = s.shape
    if n == 0:
        return np.full(t, default, dtype=np.float64)
    order = np.argsort(-s, axis=0, kind="stable")
    s_desc = np.take_along_axis(s, order, axis=0)
    # tp_at[k] = true positives when the top k images of each tag are predicted, k = 0..n
    tp_at = np.zeros((n + 1, t), dtype=np.int64)
    np.cumsum(np.take_along_axis(y, order, axis=0), axis=0, out=tp_at[1:])
    npos = tp_at[-1]
    cols = np.arange(t)

    if grid is None:
        k = np.arange(1, n + 1)[:, None]
        f1 = 2 * tp_at[1:] / (npos + k)
        cut = np.ones((n, t), dtype=bool)
        cut[:-1] = s_desc[:-1] > s_desc[1:]
        best = np.argmax(np.where(cut, f1, -1.0), axis=0)  # >= 1 valid cut per tag (k = n)
        hi = s_desc[best, cols]
        lo = s_desc[np.minimum(best + 1, n - 1), cols]
        mid = lo + (hi - lo) / 2
        thresholds = np.where((best < n - 1) & (mid > lo), mid, hi)
    else:
        grid = np.unique(np.asarray(grid, dtype=np.float64))[::-1]  # descending: ties -> higher threshold
        if grid.size == 0 or not np.isfinite(grid).all():
            raise ValueError("grid: expected a non-empty array of finite thresholds")
        n_pred = np.stack([(s >= g).sum(axis=0) for g in grid])  # G x T
        tp = np.take_along_axis(tp_at, n_pred, axis=0)
        den = npos + n_pred
        f1 = np.divide(2 * tp, den, out=np.zeros(den.shape), where=den > 0)
        thresholds = grid[np.argmax(f1, axis=0)]
    return np.where(npos > 0, thresholds, default)


def pooled_threshold(y_val: np.ndarray, scores_val: np.ndarray) -> float:
    """One F1-optimal threshold for several tags at once (their (image, tag) pairs pooled as one tag)."""
    y, s = _check(y_val, scores_val)
    return float(fit_thresholds(y.reshape(-1, 1), s.reshape(-1, 1))[0])


def fit_shrunk_thresholds(y_val: np.ndarray, scores_val: np.ndarray, buckets: np.ndarray, strength: float) -> np.ndarray:
    """Per-tag thresholds shrunk towards their bucket's pooled threshold: ``(n t + k t_b) / (n + k)``.

    ``n`` is the tag's number of validation positives and ``k = strength``: a tag with 1 positive keeps
    1 / (1 + k) of its own (noisy) threshold, a tag with hundreds keeps nearly all of it; a tag with none
    gets ``t_b``. ``buckets[j]`` is tag j's bucket id (e.g. tail / medium / head by training count); the pooled
    threshold uses the bucket's tags that have a validation positive. ``strength = 0`` is :func:`fit_thresholds`.
    """
    y, s = _check(y_val, scores_val)
    own = fit_thresholds(y, s)
    if strength == 0:
        return own
    npos = y.sum(0).astype(np.float64)
    buckets = np.asarray(buckets)
    out = own.copy()
    for b in np.unique(buckets):
        cols = np.flatnonzero(buckets == b)
        seen = cols[npos[cols] > 0]
        tb = pooled_threshold(y[:, seen], s[:, seen]) if seen.size else DEFAULT_THRESHOLD
        out[cols] = (npos[cols] * own[cols] + strength * tb) / (npos[cols] + strength)
    return out
