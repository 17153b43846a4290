"""train.rebalance: repeat factors against hand-computed values, the seeded re-sample's counts, and cRT's t."""
import numpy as np
import pytest

from bakeoff.train.rebalance import rebalanced, repeat_factors, repeat_threshold, resample, tag_repeat_factors

# 10 images x 4 tags: tag 0 in 5 images (f 0.5), tag 1 in 1 (f 0.1), tag 2 in 2 (f 0.2), tag 3 in none
Y = np.zeros((10, 4), dtype=np.uint8)
Y[0:5, 0] = 1
Y[5, 1] = 1
Y[[0, 5], 2] = 1
T = 0.3
R_TAG = [1.0, np.sqrt(0.3 / 0.1), np.sqrt(0.3 / 0.2), 1.0]  # max(1, sqrt(t / f)); 1 for a tag no image has
# image 0: tags 0, 2; image 5: tags 1, 2 (the larger factor wins); images 6-9: no tag
R_IMAGE = [np.sqrt(1.5), 1, 1, 1, 1, np.sqrt(3.0), 1, 1, 1, 1]


def test_repeat_factors_match_hand_computed_values():
    np.testing.assert_allclose(tag_repeat_factors(Y, T), R_TAG)
    np.testing.assert_allclose(repeat_factors(Y, T), R_IMAGE)
    assert repeat_factors(np.tile(Y, (7, 1)), T) == pytest.approx(np.tile(R_IMAGE, 7))  # fractions, not counts


def test_threshold_repeats_exactly_the_long_tail():
    t = repeat_threshold(50, 1000)
    y = np.zeros((1000, 2), dtype=np.uint8)
    y[:49, 0] = 1  # 49 training images: long tail (< 50)
    y[:50, 1] = 1  # 50: not
    assert t == 0.05
    r = tag_repeat_factors(y, t)
    assert r[0] == pytest.approx(np.sqrt(50 / 49)) and r[1] == 1.0


def test_resample_is_seeded_and_has_the_expected_counts():
    y = np.tile(Y, (2000, 1))
    r = repeat_factors(y, T)
    idx = resample(r, seed=3)
    assert np.array_equal(idx, resample(r, seed=3)) and not np.array_equal(idx, resample(r, seed=4))
    counts = np.bincount(idx, minlength=len(r))
    assert np.all((counts == np.floor(r)) | (counts == np.floor(r) + 1))  # floor(r) times, plus at most one
    for j, rj in enumerate(R_IMAGE):  # in expectation r_i: each of the 10 kinds of image has 2,000 copies
        mean = counts[j::10].mean()
        p = rj - np.floor(rj)
        assert abs(mean - rj) <= 4 * np.sqrt(p * (1 - p) / 2000) + 1e-12, (j, mean, rj)
    assert np.all(np.diff(idx) >= 0)  # each row's copies together, in row order


def test_rebalanced_rows_follow_the_resample():
    x = np.arange(10, dtype=np.float32)[:, None]
    same = rebalanced(x, Y, "none", T, 0)
    assert same[0] is x and same[1] is Y and same[2] is None
    xr, yr, record = rebalanced(x, Y, "crt", T, 0)
    idx = resample(repeat_factors(Y, T), 0)
    assert np.array_equal(xr[:, 0], idx) and np.array_equal(yr, Y[idx])
    assert record["n_images"] == 10 and record["n_resampled"] == len(idx) and record["images_repeated"] == 2
    assert record["max_repeat_factor"] == pytest.approx(np.sqrt(3.0)) and record["repeat_threshold"] == T
