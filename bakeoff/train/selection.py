"""From validation logits to a run's decision rule, and the validation numbers pairs are selected on.

Everything here reads validation only. The order:
1. logit adjustment: tau on a grid, each scored by validation macro-F1 of the group tags decoded by arg-max
   (no threshold is fitted, so the score is not flattered by a fit); the best tau is folded into the bias;
2. thresholds for free tags, shrunk towards their bucket's pooled threshold with a strength chosen by
   2-fold cross-fitting on validation (fit on one half, score the other);
3. the selection metric: macro-F1 (and long-tail macro-F1) on validation with every threshold cross-fitted
   and groups by arg-max: not the thresholds' own optimum. tau and the shrinkage strength (one value each,
   from short grids) are chosen on the same rows, so it is slightly optimistic, by the same small amount for
   every pair.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bakeoff.train.decision import Decision
from bakeoff.train.heads import TAUS, adjusted, group_log_prior
from bakeoff.train.thresholds import fit_shrunk_thresholds
from bakeoff.train.valmetrics import macro_ap

SHRINK_STRENGTHS = (0.0, 1.0, 3.0, 10.0, 30.0)
FOLDS = 2
SE_RESAMPLES = 200


def _num(x: float) -> float | None:
    """JSON-safe: NaN (no tag to average over) becomes None."""
    return None if x is None or np.isnan(x) else float(x)


def macro_f1(y: np.ndarray, pred: np.ndarray, tags: np.ndarray | None = None) -> float:
    """Mean F1 over tags with a positive in ``y`` (restricted to ``tags`` when given); NaN when none."""
    y, pred = np.asarray(y, dtype=bool), np.asarray(pred, dtype=bool)
    tp = (y & pred).sum(0)
    den = y.sum(0) + pred.sum(0)
    keep = y.sum(0) > 0
    if tags is not None:
        keep &= np.asarray(tags, dtype=bool)
    return float(np.mean(2 * tp[keep] / den[keep])) if keep.any() else float("nan")


def bootstrap_se(y: np.ndarray, pred: np.ndarray, tags: np.ndarray | None = None,
                 n_resamples: int = SE_RESAMPLES, seed: int = 0) -> float:
    """Standard error of :func:`macro_f1` over images (seeded bootstrap resamples of the rows)."""
    y, pred = np.asarray(y, dtype=bool), np.asarray(pred, dtype=bool)
    rng = np.random.default_rng(seed)
    vals = np.array([macro_f1(y[i], pred[i], tags) for i in rng.integers(0, len(y), size=(n_resamples, len(y)))])
    vals = vals[np.isfinite(vals)]  # a resample without a positive of ``tags`` has no macro-F1
    return float(np.std(vals, ddof=1)) if len(y) > 1 and len(vals) > 1 else float("nan")


def buckets(train_counts: np.ndarray, tail: int, head: int) -> np.ndarray:
    """0 = long tail (< tail train images), 1 = medium, 2 = head (>= head)."""
    c = np.asarray(train_counts)
    return np.where(c < tail, 0, np.where(c >= head, 2, 1))


def folds(n: int, k: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Fold id per validation row: a seeded permutation dealt round-robin (sizes differ by at most one)."""
    out = np.empty(n, dtype=int)
    out[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    return out


def crossfit_thresholds(y: np.ndarray, scores: np.ndarray, bucket: np.ndarray, strength: float,
                        fold: np.ndarray) -> np.ndarray:
    """Per-row thresholds (N x T): each fold's rows get thresholds fitted on the other folds."""
    out = np.empty(np.shape(scores), dtype=np.float64)
    for f in np.unique(fold):
        rest = fold != f
        out[~rest] = fit_shrunk_thresholds(y[rest], scores[rest], bucket, strength)
    return out


def select_tau(y: np.ndarray, logits: np.ndarray, groups: Sequence[Sequence[int]], log_prior: np.ndarray,
               taus: Sequence[float] = TAUS) -> tuple[float, dict[str, float]]:
    """The tau whose arg-max decisions give the best validation macro-F1 over group tags (ties: smaller)."""
    dec = Decision(np.zeros(y.shape[1]), tuple(map(tuple, groups)))
    in_group = ~dec.free_mask()
    scores = {f"{tau:g}": _num(macro_f1(y, dec.apply(adjusted(logits, log_prior, tau)), in_group)) for tau in taus}
    best = max(taus, key=lambda t: (-1.0 if scores[f"{t:g}"] is None else scores[f"{t:g}"], -t))
    return float(best), scores


@dataclass
class Fitted:
    decision: Decision
    tau: float
    report: dict  # what was tried and chosen, and the validation selection metrics


def fit_decision(y_val: np.ndarray, logits_val: np.ndarray, groups: Sequence[Sequence[int]],
                 train_counts: np.ndarray, tail: int = 50, head: int = 500, logit_adjust: float | None = None,
                 shrink: float | None = None, seed: int = 0) -> Fitted:
    """Choose tau (unless ``logit_adjust`` fixes it) and the shrinkage strength (unless ``shrink`` fixes it)
    on validation; return the decision rule for the *adjusted* logits and the report."""
    y = np.asarray(y_val, dtype=np.uint8)
    t = y.shape[1]
    groups = [list(g) for g in groups]
    log_prior = group_log_prior(train_counts, groups, t)
    if groups and logit_adjust is None:
        tau, tau_scores = select_tau(y, logits_val, groups, log_prior)
    else:
        tau, tau_scores = float(logit_adjust or 0.0), {}
    z = adjusted(logits_val, log_prior, tau)
    base = Decision(np.full(t, 0.5), tuple(map(tuple, groups)))
    scores = base.scores(z)
    free = base.free_mask()
    bucket = buckets(train_counts, tail, head)
    fold = folds(len(y), seed=seed)
    strengths = SHRINK_STRENGTHS if shrink is None else (float(shrink),)
    cross: dict[str, float] = {}
    yf, sf, bf = y[:, free], scores[:, free], bucket[free]  # thresholds (and bucket pools) see free tags only

    def crossfit_pred(k: float) -> np.ndarray:
        pred = base.apply(scores)
        pred[:, free] = sf >= crossfit_thresholds(yf, sf, bf, k, fold)
        return pred

    for k in strengths:
        cross[f"{k:g}"] = _num(macro_f1(y, crossfit_pred(k), free))
    k_best = max(strengths, key=lambda k: (-1.0 if cross[f"{k:g}"] is None else cross[f"{k:g}"], -k))
    thresholds = np.full(t, 0.5)
    thresholds[free] = fit_shrunk_thresholds(yf, sf, bf, k_best)
    decision = Decision(thresholds, tuple(map(tuple, groups)))
    pred = crossfit_pred(k_best)
    tail = bucket == 0
    report = {
        "groups": len(groups), "group_tags": int((~free).sum()), "free_tags": int(free.sum()),
        "logit_adjust_tau": tau, "tau_val_macro_f1": tau_scores,
        "threshold_shrink": k_best, "shrink_crossfit_macro_f1": cross,
        "selection": {"metric": "val_macro_f1_crossfit", "val_macro_f1_crossfit": _num(macro_f1(y, pred)),
                      "val_macro_f1_crossfit_se": _num(bootstrap_se(y, pred, seed=seed)),
                      "val_tail_f1_crossfit": _num(macro_f1(y, pred, tail)),
                      "val_tail_f1_crossfit_se": _num(bootstrap_se(y, pred, tail, seed=seed)),
                      "val_map": _num(macro_ap(y, decision.scores(z))), "n_val": int(len(y)),
                      "how": f"validation macro-F1; free-tag thresholds fitted on the other half ({FOLDS}-fold "
                             "cross-fitting), single-valued fields by arg-max"},
    }
    return Fitted(decision, tau, report)
