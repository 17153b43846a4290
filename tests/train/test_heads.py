"""Head losses against hand-computed values, logit adjustment, and the decision rule they feed."""
import math

import numpy as np
import pytest
import torch

from bakeoff.train.decision import Decision, single_valued_groups
from bakeoff.train.heads import HeadLoss, adjusted, group_log_prior, initial_bias
from bakeoff.train.losses import MultiLabelLoss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_head_loss_hand_computed():
    z = torch.tensor([[2.0, 0.0, 1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss = HeadLoss([[0, 1]], "bce", n_tags=4)(z, y)
    ce = math.log(math.exp(2) + 1) - 2  # softmax CE of the true value (tag 0) in group {0, 1}
    bce = softplus(-1.0) + softplus(0.5)  # free tags 2 (positive) and 3 (negative)
    assert loss.item() == pytest.approx((ce + bce) / 3, rel=1e-6)  # 1 group + 2 free tags


def test_image_without_a_value_adds_nothing_to_its_group():
    z = torch.tensor([[3.0, -1.0, 0.2], [0.0, 0.0, 0.2]])
    y = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss = HeadLoss([[0, 1]], "bce", n_tags=3)(z, y)
    assert loss.item() == pytest.approx(softplus(-0.2) / 2, rel=1e-6)


def test_without_groups_it_is_the_plain_loss_and_batches_over_settings():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 5, 4, generator=g), (torch.rand(5, 4, generator=g) < 0.3).float()
    for kind in ("bce", "asl"):
        plain = MultiLabelLoss(kind)
        head = HeadLoss((), kind)
        torch.testing.assert_close(head(z[0], y), plain(z[0], y))
        torch.testing.assert_close(head(z, y), torch.stack([plain(zi, y) for zi in z]))
    grouped = HeadLoss([[0, 1, 2]], "bce", n_tags=4)
    torch.testing.assert_close(grouped(z, y), torch.stack([grouped(zi, y) for zi in z]))


def test_logit_adjustment_favours_rare_values():
    counts = np.array([90, 10, 5])
    lp = group_log_prior(counts, [[0, 1]], 3)
    assert lp[2] == 0 and lp[0] == pytest.approx(math.log(91 / 102)) and lp[1] == pytest.approx(math.log(11 / 102))
    z = np.array([[1.0, 0.0, 0.0]])
    assert Decision(np.full(3, 0.5), ((0, 1),)).apply(adjusted(z, lp, 0.0))[0, 0]
    assert Decision(np.full(3, 0.5), ((0, 1),)).apply(adjusted(z, lp, 1.0))[0, 1]  # 1 - log(91/11) < 0 + 0


def test_initial_bias_starts_at_training_frequencies():
    y = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0]])
    b = initial_bias(y, [[0, 1]])
    assert b[0] == pytest.approx(math.log(4 / 6)) and b[1] == pytest.approx(math.log(2 / 6))
    assert b[2] == pytest.approx(math.log(0.25 / 0.75))


def test_single_valued_groups_on_crafted_taxonomies():
    fields = ["colour", "colour", "colour", "style", "style", "size", "", ""]
    y = np.array([[1, 0, 0, 1, 1, 1, 1, 1],   # two styles in one image: style is multi-valued
                  [0, 1, 0, 0, 1, 0, 0, 1],
                  [0, 0, 1, 0, 0, 0, 1, 0]])
    assert single_valued_groups(y, fields) == [[0, 1, 2]]  # "size" has one tag; bare tags never group
    y[2, 2] = 0  # an image without a colour: an arg-max would force one on it, so colour is no group
    assert single_valued_groups(y, fields) == []
    assert single_valued_groups(np.zeros((0, 8)), fields) == []
    assert single_valued_groups(y, [""] * 8) == []


def test_decision_rule_argmax_in_groups_thresholds_elsewhere():
    d = Decision(np.array([0.9, 0.9, 0.9, 0.4]), ((0, 1, 2),))
    s = np.array([[0.2, 0.5, 0.3, 0.4], [0.1, 0.1, 0.8, 0.39]])
    np.testing.assert_array_equal(d.apply(s), [[0, 1, 0, 1], [0, 0, 1, 0]])  # below 0.9, still the arg-max
    scores = d.scores(np.array([[0.0, 1.0, 2.0, 0.0]]))
    assert scores[0, :3].sum() == pytest.approx(1) and scores[0, 3] == pytest.approx(0.5)
    taxonomy = ["c=a", "c=b", "c=d", "x"]
    again = Decision.from_json(d.to_json(taxonomy), taxonomy)
    assert again.groups == d.groups and np.array_equal(again.thresholds, d.thresholds)
    old = Decision.from_json({"thresholds": [0.3, 0.6], "tags": ["a", "b"]})  # thresholds.json before groups
    assert old.groups == () and old.apply(np.array([[0.3, 0.5]])).tolist() == [[True, False]]
