"""bakeoff.train.thresholds: the vectorised search equals brute force over candidate thresholds."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bakeoff.train.thresholds import DEFAULT_THRESHOLD, fit_thresholds

REPO = Path(__file__).resolve().parents[2]


def f1_at(y: np.ndarray, s: np.ndarray, thr: float) -> float:
    pred = s >= thr
    tp = int((pred & (y == 1)).sum())
    return 2 * tp / (int(y.sum()) + int(pred.sum()))


def brute_force(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Try every distinct score as a cut (highest first); return the midpoint below the best one."""
    out = np.full(y.shape[1], DEFAULT_THRESHOLD)
    for j in range(y.shape[1]):
        if y[:, j].sum() == 0:
            continue
        values = np.unique(s[:, j])[::-1]
        best = int(np.argmax([f1_at(y[:, j], s[:, j], v) for v in values]))
        hi = values[best]
        out[j] = hi if best == len(values) - 1 else values[best + 1] + (hi - values[best + 1]) / 2
    return out


def case(seed: int, n: int = 150, t: int = 30, logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, t)) < rng.choice([0.01, 0.05, 0.3], size=t)).astype(np.uint8)
    y[:, 0] = 0  # no validation positive
    s = 0.3 * y + rng.random((n, t)) * 0.7
    s[:, 1] = 0.42  # every score tied
    s = np.round(s, 2)  # ties
    return y, (4 * (s - 0.5) if logits else s)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("logits", [False, True])
def test_exact_search_equals_brute_force(seed, logits):
    y, s = case(seed, logits=logits)
    thr = fit_thresholds(y, s)
    np.testing.assert_array_equal(thr, brute_force(y, s))
    assert thr[0] == DEFAULT_THRESHOLD
    assert thr[1] == s[0, 1]  # all tied: predict every image, threshold is the score itself
    for j in range(2, y.shape[1]):
        if y[:, j].any():
            assert not np.isin(thr[j], s[:, j]) or thr[j] == s[:, j].min()  # a midpoint, never on a score


def test_float32_scores_keep_their_cut():
    y, s = case(3)
    s32 = s.astype(np.float32)
    thr = fit_thresholds(y, s32)
    assert thr.dtype == np.float64
    best = brute_force(y, s32.astype(np.float64))
    for j in range(y.shape[1]):
        assert f1_at(y[:, j], s32[:, j], thr[j]) == (f1_at(y[:, j], s32[:, j], best[j]) if y[:, j].any() else 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_grid_search_equals_brute_force(seed):
    y, s = case(seed)
    grid = np.linspace(0, 1, 21)
    thr = fit_thresholds(y, s, grid=grid)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            assert thr[j] == DEFAULT_THRESHOLD
            continue
        f1s = [f1_at(y[:, j], s[:, j], g) if (s[:, j] >= g).any() else 0.0 for g in grid[::-1]]
        assert thr[j] == grid[::-1][int(np.argmax(f1s))]  # best F1, highest threshold on ties


def test_invalid_input():
    y, s = case(0)
    s[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN/Inf values \(first at row 3, tag 4\)"):
        fit_thresholds(y, s)
    with pytest.raises(ValueError, match="shaped like"):
        fit_thresholds(y[:, :5], s)
    with pytest.raises(ValueError, match="0 or 1"):
        fit_thresholds(y * 2, np.zeros_like(s))
    with pytest.raises(ValueError, match="grid"):
        fit_thresholds(y, np.zeros_like(s), grid=[])


def test_train_does_not_import_evaluate():
    code = "import sys, train.thresholds; sys.exit(any(m.split('.')[0] == 'evaluate' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
