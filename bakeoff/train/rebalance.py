"""Class-balanced re-sampling for classifier re-training (cRT; Kang et al. 2020, "Decoupling representation and
classifier"), made multi-label with repeat-factor sampling (LVIS; Gupta et al. 2019).

Per tag ``f_c`` = the fraction of training images with tag c and ``r_c = max(1, sqrt(t / f_c))``; per image
``r_i`` = the largest ``r_c`` of its tags (1 for an image without tags). The re-sample holds each image
``floor(r_i)`` times, plus once more with probability ``frac(r_i)`` (seeded), so image i appears ``r_i`` times in
expectation. ``t`` is the long-tail fraction: ``long_tail_threshold / train-split size``, so exactly the tags the
toolkit calls long-tail (fewer than ``long_tail_threshold`` training images) are repeated.
"""
from __future__ import annotations

import numpy as np

REBALANCE = ("none", "crt")  # none: the plain training set; crt: the head trained on the repeat-factor re-sample
METHOD = "cRT: linear head trained on a repeat-factor re-sample of the training set (Kang et al. 2020; LVIS 2019)"


def repeat_threshold(long_tail_images: int, n_train_split: int) -> float:
    """``t``: the training fraction below which a tag is long-tail (and so repeated)."""
    return long_tail_images / max(1, n_train_split)


def tag_repeat_factors(y: np.ndarray, t: float) -> np.ndarray:
    """``r_c = max(1, sqrt(t / f_c))`` per tag (1 for a tag no image has: it repeats nothing)."""
    f = np.asarray(y, dtype=bool).mean(0) if len(y) else np.zeros(np.shape(y)[1])
    return np.sqrt(t / np.where(f > 0, f, np.inf)).clip(min=1.0)


def repeat_factors(y: np.ndarray, t: float) -> np.ndarray:
    """``r_i`` per image: the largest repeat factor of its tags, at least 1."""
    y = np.asarray(y, dtype=bool)
    return np.where(y, tag_repeat_factors(y, t), 1.0).max(1, initial=1.0)


def resample(r: np.ndarray, seed: int) -> np.ndarray:
    """Row indices of the re-sample: row i ``floor(r_i)`` times, plus one with probability ``frac(r_i)``."""
    whole = np.floor(r)
    counts = whole.astype(int) + (np.random.default_rng(seed).random(len(r)) < r - whole)
    return np.repeat(np.arange(len(r)), counts)


def rebalanced(x: np.ndarray, y: np.ndarray, rebalance: str, t: float, seed: int
               ) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(x, y) as a head trains on them: unchanged for ``none``; for ``crt`` the rows of their repeat-factor
    re-sample (a copy), with a record of it."""
    if rebalance == "none":
        return x, y, None
    r = repeat_factors(y, t)
    idx = resample(r, seed)
    return x[idx], y[idx], {"method": METHOD, "repeat_threshold": t, "seed": seed, "n_images": int(len(r)),
                            "n_resampled": int(len(idx)), "images_repeated": int((r > 1).sum()),
                            "max_repeat_factor": float(r.max(initial=1.0))}
