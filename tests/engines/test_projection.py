"""bakeoff.engines.projection: counters, roofline arithmetic, calibration against the anchor, and the ESTIMATE labels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bakeoff.engines.projection import (
    ANCHOR,
    LABEL,
    RESNET50_COST,
    T4,
    Target,
    calibrate,
    format_estimate,
    model_cost,
    project,
    roofline_ms,
)


def test_model_cost_of_one_convolution():
    cost = model_cost(nn.Conv2d(3, 4, 3, padding=1), 8)
    assert cost["params"] == 3 * 9 * 4 + 4 and cost["weight_bytes"] == 2 * 112
    assert cost["flops_per_image"] == 2 * (3 * 9) * 4 * 8 * 8  # multiply-adds x 2
    assert cost["activation_bytes_per_image"] == 2 * 2 * (4 * 8 * 8) + 2 * (3 * 8 * 8)  # output w+r, input read


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(192, 192)  # a parameter, so model_cost knows the device and dtype

    def forward(self, x):  # q = k = v: 1 image x 3 heads x 8 tokens x 8 dims
        q = self.proj(x.reshape(1, 1, 192)).reshape(1, 3, 8, 8)
        return F.scaled_dot_product_attention(q, q, q)


def test_model_cost_counts_cpu_attention():
    cost = model_cost(Attention(), 8)
    attention = 2 * 2 * (3 * 8 * 8 * 8)  # QK^T and AV: two matmuls of h*n*n*d multiply-adds
    assert cost["flops_per_image"] == 2 * 192 * 192 + attention


class MhaImage(nn.Module):
    """An image as 4 tokens of width 48 through nn.MultiheadAttention (open_clip's attention module)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(48, 4, batch_first=True)  # an even head count: the fast path takes it

    def forward(self, x):  # 1 x 3 x 8 x 8 -> 1 x 4 tokens x 48
        tokens = x.reshape(1, 3, 4, 16).permute(0, 2, 1, 3).reshape(1, 4, 48)
        return self.attn(tokens, tokens, tokens, need_weights=False)[0]


def test_model_cost_counts_multihead_attention_fast_path():
    """In eval + no_grad, MultiheadAttention runs one fused op that FlopCounterMode would count as 0."""
    model = MhaImage()
    n, d = 4, 48
    projections = 2 * n * d * (3 * d) + 2 * n * d * d  # QKV in-projection and the output projection
    attention = 2 * 2 * n * n * d  # QK^T and AV over all heads
    assert model_cost(model, 8)["flops_per_image"] == projections + attention
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_resnet50_anchor_cost_is_what_the_counters_say():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # shapes only: fast
        model = torchvision.models.resnet50()
    cost = model_cost(model, 224)
    assert {k: cost[k] for k in RESNET50_COST} == RESNET50_COST


def test_roofline_arithmetic():
    target = Target("toy", peak_flops=1e12, bandwidth=1e9, source="test")
    # compute 4 * 1e9 / (0.5 * 1e12) = 8 ms; memory (1e6 + 4 * 1e6) / (0.5 * 1e9) = 10 ms
    assert roofline_ms(1e9, 1e6, 1e6, 4, 0.5, target) == (pytest.approx(10.0), "memory")
    assert roofline_ms(2e9, 1e6, 1e6, 4, 0.5, target) == (pytest.approx(16.0), "compute")


def test_calibration_reproduces_the_anchor():
    eff = calibrate()
    assert 0.05 < eff < 1.0
    est = project(RESNET50_COST, [ANCHOR.batch, 1])
    assert est["efficiency"] == pytest.approx(eff, abs=1e-4)
    assert est["batches"][0]["throughput_ips"] == pytest.approx(ANCHOR.throughput_ips, rel=1e-3)
    assert est["batches"][1]["latency_ms"] < est["batches"][0]["latency_ms"]


def test_estimate_is_labelled_and_cites_its_anchor():
    est = project({"flops_per_image": 6e8, "weight_bytes": 7e6, "activation_bytes_per_image": 2.7e7}, [1, 8], T4)
    assert est["label"] == LABEL == "ESTIMATE (not measured)" and "T4" in est["target"]
    assert est["anchor"]["source"].startswith("https://") and est["anchor"]["throughput_ips"] == ANCHOR.throughput_ips
    assert est["int8_reference"]["source"] and [r["batch"] for r in est["batches"]] == [1, 8]
    text = format_estimate(est)
    assert text.splitlines()[0].endswith(f"{LABEL} ===")
    assert all(line.endswith(LABEL) for line in text.splitlines() if line.startswith("batch "))
