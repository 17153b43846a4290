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

Intervals are BCa (bias-corrected and accelerated; Efron 1987, scipy.stats.bootstrap's default), not plain
percentiles: macro-F1 over many rare tags has a skewed, downward-biased bootstrap distribution (on fashion the
resamples' mean sits 0.004 below the point estimate), which a percentile interval copies. BCa's bias correction
comes from the share of resamples below the point estimate, its acceleration from the leave-one-image-out
jackknife, computed exactly from per-tag counts (:func:`jackknife_macro_f1`).
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from bakeoff.evaluate.metrics import _pair, _restrict, check_binary, f1_from_counts, macro_f1, per_tag_counts


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


def _scored(y_true: np.ndarray, y_pred: np.ndarray, tags_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices restricted to the fixed tag set: tags in ``tags_mask`` with a positive on the full test set."""
    y_true, y_pred = _pair(y_true, y_pred, "y_pred")
    keep = _restrict(tags_mask, y_true.shape[1])
    y_true, y_pred = y_true[:, keep], check_binary(y_pred, "y_pred")[:, keep]
    scored = y_true.any(axis=0)
    return y_true[:, scored], y_pred[:, scored]


def bootstrap_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray,
                       tags_mask: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 of each resample in ``idx`` (over tags in ``tags_mask``), an ``(R,)`` float64 array."""
    y_true, y_pred = _scored(y_true, y_pred, tags_mask)
    if not y_true.shape[1]:
        return np.full(len(idx), np.nan)
    w = resample_weights(idx, y_true.shape[0])
    tp = w @ (y_true & y_pred).astype(np.float32)
    fp = w @ y_pred.astype(np.float32) - tp
    fn = w @ y_true.astype(np.float32) - tp
    full = f1_from_counts(*per_tag_counts(y_true, y_pred))
    f1 = np.where(tp + fn > 0, f1_from_counts(tp, fp, fn), full)
    return f1.mean(axis=1).astype(np.float64)


def jackknife_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, tags_mask: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 with each test image left out in turn (same tag set and rule as the bootstrap): ``(N,)`` float64;
    NaN when no tag is scored."""
    y_true, y_pred = _scored(y_true, y_pred, tags_mask)
    if not y_true.shape[1]:
        return np.full(y_true.shape[0], np.nan)
    tp_i = (y_true & y_pred).astype(np.float32)
    fp_i, fn_i = y_pred.astype(np.float32) - tp_i, y_true.astype(np.float32) - tp_i
    tp, fp, fn = tp_i.sum(0) - tp_i, fp_i.sum(0) - fp_i, fn_i.sum(0) - fn_i
    full = f1_from_counts(*per_tag_counts(y_true, y_pred))
    return np.where(tp + fn > 0, f1_from_counts(tp, fp, fn), full).mean(axis=1).astype(np.float64)


def bca_interval(samples: np.ndarray, observed: float, jackknife: np.ndarray,
                 level: float = 0.95) -> tuple[float, float]:
    """BCa interval at ``level`` from the bootstrap ``samples``, the full-sample ``observed`` value and the
    leave-one-out ``jackknife`` values (NaNs left out); (NaN, NaN) when there are no samples."""
    if not 0 < level < 1:
        raise ValueError(f"level: must lie in (0, 1), got {level}")
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    jackknife = np.asarray(jackknife, dtype=np.float64)
    jackknife = jackknife[~np.isnan(jackknife)]
    if samples.size == 0 or np.isnan(observed):
        return float("nan"), float("nan")
    normal, b = NormalDist(), samples.size
    below = (np.sum(samples < observed) + 0.5 * np.sum(samples == observed)) / b
    z0 = normal.inv_cdf(min(max(below, 0.5 / b), 1 - 0.5 / b))  # bias correction, finite
    d = jackknife.mean() - jackknife if jackknife.size else np.zeros(1)
    spread = np.sum(d ** 2)
    accel = float(np.sum(d ** 3) / (6 * spread ** 1.5)) if spread > 0 else 0.0
    qs = []
    for alpha in (0.5 * (1 - level), 0.5 * (1 + level)):
        z = z0 + normal.inv_cdf(alpha)
        qs.append(100 * normal.cdf(z0 + z / (1 - accel * z)))
    lo, hi = np.percentile(samples, qs)
    return float(lo), float(hi)


def paired_bootstrap(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, idx: np.ndarray,
                     tags_mask: np.ndarray | None = None, level: float = 0.95) -> dict:
    """Compare the macro-F1 of predictions ``a`` and ``b`` on the same resamples.

    Returns the full-test-set values (``macro_f1_a``, ``macro_f1_b``, ``observed_diff`` = a - b), the
    bootstrap ``mean_diff`` with its BCa ``ci`` at ``level``, ``p_a_better`` (the fraction of
    resamples where a beats b, ties counting half) and ``n_resamples`` used (non-NaN).
    """
    diff = (bootstrap_macro_f1(y_true, pred_a, idx, tags_mask)
            - bootstrap_macro_f1(y_true, pred_b, idx, tags_mask))
    diff = diff[~np.isnan(diff)]
    a, b = macro_f1(y_true, pred_a, tags_mask)[0], macro_f1(y_true, pred_b, tags_mask)[0]
    jackknife = jackknife_macro_f1(y_true, pred_a, tags_mask) - jackknife_macro_f1(y_true, pred_b, tags_mask)
    return {
        "macro_f1_a": a,
        "macro_f1_b": b,
        "observed_diff": a - b,
        "mean_diff": float(diff.mean()) if diff.size else float("nan"),
        "ci": list(bca_interval(diff, a - b, jackknife, level)),
        "level": level,
        "p_a_better": float(np.mean((diff > 0) + 0.5 * (diff == 0))) if diff.size else float("nan"),
        "n_resamples": int(diff.size),
    }
