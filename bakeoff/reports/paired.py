"""Paired-bootstrap comparisons of two evaluations, on the resamples evaluate drew for its intervals.

Both evaluations are scored on the same test images, each run's tags decided by its own rule
(:meth:`reports.artifacts.Evaluation.decisions`: arg-max within each softmax group, thresholds elsewhere); the
difference of their macro-F1 (over every tag, or the tags of one frequency bucket) is resampled image-wise
with the seed and count recorded in metrics.json (``ci.seed``, ``ci.n_resamples``), so these comparisons pair
with the intervals shown beside them.
Without the test labels (the dataset is not reachable) no comparison can be made: :meth:`Comparer.compare`
returns None and callers fall back to, and say, something weaker.
"""
from __future__ import annotations

import numpy as np

from bakeoff.evaluate.bootstrap import bootstrap_indices, paired_bootstrap
from bakeoff.reports.artifacts import Evaluation, HeldOutLabels, ReportError, dig


class Comparer:
    """Memoised paired bootstraps between evaluations of one test split."""

    def __init__(self, labels: HeldOutLabels | None, n_resamples: int = 1000, seed: int = 0, level: float = 0.95,
                 unavailable: str = ""):
        self.labels = labels
        self.level = level
        self.n_resamples, self.seed = n_resamples, seed
        self.unavailable = unavailable if labels is None else ""
        self._idx = None if labels is None else bootstrap_indices(len(labels.y_true), n_resamples, seed)
        self._decisions: dict[str, np.ndarray] = {}
        self._results: dict[tuple, dict] = {}

    @property
    def available(self) -> bool:
        return self.labels is not None

    def _decided(self, ev: Evaluation) -> np.ndarray:
        if ev.rel not in self._decisions:
            if not self.labels.matches(ev):
                raise ReportError(f"{ev.rel}: scored on another dataset or test split than {self.labels.dataset.root} "
                                  f"(dataset hash {str(dig(ev.doc, 'dataset.hash'))[:12]}); re-evaluate it")
            self._decisions[ev.rel] = ev.decisions()
        return self._decisions[ev.rel]

    def compare(self, a: Evaluation, b: Evaluation, bucket: str | None = None) -> dict | None:
        """Macro-F1 of ``a`` minus ``b`` (on ``bucket``'s tags when given): observed difference, its CI,
        P(a better), ``separated`` (the CI excludes 0), and the prediction files used; None without labels."""
        if not self.available:
            return None
        key = (a.rel, b.rel, bucket)
        if key not in self._results:
            mask = None if bucket is None else a.bucket_mask(bucket)
            if mask is not None and not mask.any():
                return None
            res = paired_bootstrap(self.labels.y_true, self._decided(a), self._decided(b), self._idx, mask, self.level)
            lo, hi = res["ci"]
            self._results[key] = {
                "a": a.pair, "a_eval": a.name, "b": b.pair, "b_eval": b.name, "bucket": bucket or "all",
                "observed_diff": res["observed_diff"], "ci": [lo, hi], "level": self.level,
                "p_a_better": res["p_a_better"], "n_resamples": res["n_resamples"],
                "separated": bool(not np.isnan(lo) and not lo <= 0 <= hi),
                "sources": [f"{e.rel.rsplit('/', 1)[0]}/predictions.npy" for e in (a, b)]}
        return self._results[key]


def comparer_for(evaluations: list[Evaluation], data: str | None) -> Comparer:
    """A comparer over the test labels of ``data`` (default: the dataset the evaluations record), on their resamples.

    The evaluations must all be of one dataset version and test split; a dataset that cannot be read gives an
    unavailable comparer whose ``unavailable`` says why.
    """
    keys = {(dig(e.doc, "dataset.hash"), dig(e.doc, "test.ids_sha256")) for e in evaluations}
    if len(keys) > 1:
        listed = "; ".join(f"{e.rel}: dataset {str(dig(e.doc, 'dataset.hash'))[:12]}" for e in evaluations)
        raise ReportError(f"the evaluations were scored on different datasets or test splits ({listed}); "
                          "one report compares runs of one dataset")
    ci = evaluations[0].doc.get("ci", {}) if evaluations else {}
    resampling = {"n_resamples": ci.get("n_resamples", 1000), "seed": ci.get("seed", 0), "level": ci.get("level", 0.95)}
    root = data or (dig(evaluations[0].doc, "dataset.path") if evaluations else None)
    if root is None:
        return Comparer(None, **resampling, unavailable="no scored evaluation records a dataset")
    try:
        labels = HeldOutLabels.load(root)
    except (OSError, ValueError, KeyError) as e:
        return Comparer(None, **resampling, unavailable=f"the test labels could not be read ({e})")
    if evaluations and not labels.matches(evaluations[0]):
        raise ReportError(f"{root}: not the dataset version or test split {evaluations[0].rel} was scored on "
                          f"(its hash is {labels.content_hash[:12]}, the evaluation records "
                          f"{str(dig(evaluations[0].doc, 'dataset.hash'))[:12]}); pass the right --data")
    return Comparer(labels, **resampling)
