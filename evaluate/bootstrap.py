"""Bootstrap uncertainty for macro-F1 over test images, vectorised over resamples.

A resample draws N images with replacement; it is represented by the multiplicity of each image, so the
per-tag counts of all R resamples are three matrix products ``W @ X`` with ``W`` the ``R x N`` multiplicity
matrix (float32: counts are integers below 2**24, so exact).

Tag set: every resample averages over the SAME tags, those scored on the full test set (a positive in test,
inside the mask). A tag that loses all its positives in a resample keeps its full-test-set F1 there. Dropping
such tags instead (re-deciding the tag set per resample) biases every resample upward, because the tags that
drop out are the rare ones with low F1: on the fashion test split, with 63 scored tags of <= 2 positives, the
interval then missed its own point estimate (0.322 vs [0.329, 0.362]). Counting them as F1 = 0 biases downward
a little; keeping their value is neutral. With no scored tag at all the result is NaN, which intervals and
comparisons leave out. Pairing: compare runs on the same ``idx`` from :func:`bootstrap_indices`.
"""
from __future__ import annotations

import numpy as np

from evaluate.metrics import _pair, _restrict, check_binary, f1_from_counts, macro_f1, per_tag_counts


def bootstrap_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``n_resamples x n`` row indices drawn with replacement; the same seed gives the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def resample_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """``R x n`` float32 matrix of how many times each row appears in each resample of ``idx``."""
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.shape[1] != n:
        raise ValueError(f"idx: expected resamples of shape (R, {n}) for {n} images, got {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"idx: row indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    r = idx.shape[0]
    flat = (idx + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float32)


def bootstrap_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray,
                       tags_mask: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 of each resample in ``idx`` (over tags in ``tags_mask``), an ``(R,)`` float64 array."""
    y_true, y_pred = _pair(y_true, y_pred, "y_pred")
    keep = _restrict(tags_mask, y_true.shape[1])
    y_true, y_pred = y_true[:, keep], check_binary(y_pred, "y_pred")[:, keep]
    scored = y_true.any(axis=0)
    y_true, y_pred = y_true[:, scored], y_pred[:, scored]
    if not scored.any():
        return np.full(len(idx), np.nan)
    w = resample_weights(idx, y_true.shape[0])
    tp = w @ (y_true & y_pred).astype(np.float32)
    fp = w @ y_pred.astype(np.float32) - tp
    fn = w @ y_true.astype(np.float32) - tp
    full = f1_from_counts(*per_tag_counts(y_true, y_pred))
    f1 = np.where(tp + fn > 0, f1_from_counts(tp, fp, fn), full)
    return f1.mean(axis=1).astype(np.float64)


def confidence_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval holding ``level`` of the non-NaN ``samples``; (NaN, NaN) when there are none."""
    if not 0 < level < 1:
        raise ValueError(f"level: must lie in (0, 1), got {level}")
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def paired_bootstrap(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, idx: np.ndarray,
                     tags_mask: np.ndarray | None = None, level: float = 0.95) -> dict:
    """Compare the macro-F1 of predictions ``a`` and ``b`` on the same resamples.

    Returns the full-test-set values (``macro_f1_a``, ``macro_f1_b``, ``observed_diff`` = a - b), the
    bootstrap ``mean_diff`` with its percentile ``ci`` at ``level``, ``p_a_better`` (the fraction of
    resamples where a beats b, ties counting half) and ``n_resamples`` used (non-NaN).
    """
    diff = (bootstrap_macro_f1(y_true, pred_a, idx, tags_mask)
            - bootstrap_macro_f1(y_true, pred_b, idx, tags_mask))
    diff = diff[~np.isnan(diff)]
    a, b = macro_f1(y_true, pred_a, tags_mask)[0], macro_f1(y_true, pred_b, tags_mask)[0]
    return {
        "macro_f1_a": a,
        "macro_f1_b": b,
        "observed_diff": a - b,
        "mean_diff": float(diff.mean()) if diff.size else float("nan"),
        "ci": list(confidence_interval(diff, level)),
        "level": level,
        "p_a_better": float(np.mean((diff > 0) + 0.5 * (diff == 0))) if diff.size else float("nan"),
        "n_resamples": int(diff.size),
    }
