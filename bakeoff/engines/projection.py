"""A T4 latency ESTIMATE for machines that are not a T4: a calibrated roofline, never a measurement.

Per image the model costs ``F`` FLOPs (torch's FlopCounterMode at batch 1) and moves ``A`` activation bytes
(every convolution / matmul / attention output written once and read once in FP16: TensorRT fuses the
pointwise ops into them), plus ``W`` weight bytes once per batch. A batch of ``b`` on the T4 then takes

    t(b) = max(b * F / (e * P), (W + b * A) / (e * B))

with P = 65 TFLOPS (FP16 tensor cores) and B = 320 GB/s (T4 datasheet). The one efficiency factor ``e`` is
calibrated so that the same formula, with the same counters, reproduces a published ResNet-50 FP16 T4
throughput (ANCHOR below). It ignores kernel-launch and synchronisation overheads, so batch-1 figures are
a lower bound on real latency; and it applies ResNet-50's efficiency to every architecture.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

LABEL = "ESTIMATE (not measured)"
FP16_BYTES = 2


@dataclass(frozen=True)
class Target:
    name: str
    peak_flops: float  # dense FP16 tensor-core FLOP/s
    bandwidth: float  # bytes/s
    source: str


T4 = Target("NVIDIA T4", 65e12, 320e9, "NVIDIA T4 datasheet: 65 TFLOPS mixed-precision FP16/FP32, 320 GB/s GDDR6")
TARGETS = {"t4": T4}


@dataclass(frozen=True)
class Anchor:
    """A published throughput of a reference model on the target, with that model's counted cost."""

    model: str
    flops_per_image: float
    weight_bytes: float
    activation_bytes_per_image: float
    batch: int
    throughput_ips: float
    precision: str
    source: str
    note: str


# Counted with model_cost(torchvision.models.resnet50(), 224) (tests/engines/test_projection.py re-counts it).
RESNET50_COST = {"flops_per_image": 8_178_368_512, "weight_bytes": 51_114_064, "activation_bytes_per_image": 44_760_992}

# Source: NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/triton/resnet50/README.md, section
# "Online: NVIDIA T4, ONNX Runtime TensorRT with FP16" (Triton 20.11, dynamic batching, preferred batch 64/128):
# the throughput plateaus at ~2,050-2,150 inferences/s; peak 2,145.3 inferences/s at 96 concurrent requests.
ANCHOR = Anchor(
    model="ResNet-50 v1.5 (224 x 224)", **RESNET50_COST, batch=64, throughput_ips=2145.3,
    precision="FP16 (TensorRT via ONNX Runtime's TensorRT execution provider)",
    source="https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/ConvNets/triton/"
           "resnet50/README.md#online-nvidia-t4-onnx-runtime-tensorrt-with-fp16",
    note="served by Triton (includes server overhead), so the calibrated efficiency errs on the slow side",
)
# For context only (not used): MLPerf Inference v0.5, closed, NVIDIA T4x8, ResNet-50 v1.5 Offline, INT8 TensorRT:
# 44,977.8 samples/s for 8 GPUs = 5,622 per T4 (mlcommons/inference_results_v0.5,
# closed/NVIDIA/results/T4x8/resnet/Offline/performance/run_1/mlperf_log_summary.txt).
INT8_REFERENCE = {"model": "ResNet-50 v1.5", "throughput_ips_per_t4": 5622.2, "precision": "INT8",
                  "source": "MLPerf Inference v0.5 closed, NVIDIA T4x8 Offline: 44,977.8 samples/s / 8 "
                            "(mlcommons/inference_results_v0.5 closed/NVIDIA/results/T4x8/resnet/Offline)"}

HEAVY_OPS = {torch.ops.aten.convolution.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
             torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default}
# FlopCounterMode has no formula for the CPU flash-attention kernel (it counts 0): use the SDPA one.
CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                  lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)}


class _ActivationElements(TorchDispatchMode):
    """Counts the elements of every heavy op's (first) output."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in HEAVY_OPS:
            self.elements += (out[0] if isinstance(out, (tuple, list)) else out).numel()
        return out


@torch.no_grad()
def model_cost(model: nn.Module, img_size: int) -> dict:
    """Parameters, FLOPs per image and FP16 bytes (weights; activations per image) of ``model`` at batch 1."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, device=p.device, dtype=p.dtype)
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # nn.MultiheadAttention's inference fast path is one fused op FlopCounterMode counts as 0 (open_clip's ViTs
    # use it): count the decomposed projections and attention instead.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as flops, _ActivationElements() as acts:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)
    params = sum(q.numel() for q in model.parameters())
    return {"params": params, "flops_per_image": flops.get_total_flops(), "weight_bytes": params * FP16_BYTES,
            # written once, read once; plus the input image read once
            "activation_bytes_per_image": 2 * FP16_BYTES * acts.elements + FP16_BYTES * x.numel()}


def roofline_ms(flops_per_image: float, weight_bytes: float, activation_bytes_per_image: float, batch: int,
                efficiency: float, target: Target = T4) -> tuple[float, str]:
    """(milliseconds for one batch, "compute" | "memory": the bound that sets it)."""
    compute = batch * flops_per_image / (efficiency * target.peak_flops)
    memory = (weight_bytes + batch * activation_bytes_per_image) / (efficiency * target.bandwidth)
    return 1e3 * max(compute, memory), "compute" if compute >= memory else "memory"


def calibrate(anchor: Anchor = ANCHOR, target: Target = T4) -> float:
    """The efficiency at which the roofline reproduces the anchor's published throughput."""
    ideal_ms, _ = roofline_ms(anchor.flops_per_image, anchor.weight_bytes, anchor.activation_bytes_per_image,
                              anchor.batch, 1.0, target)
    return ideal_ms / (1e3 * anchor.batch / anchor.throughput_ips)


def project(cost: dict, batches: list[int], target: Target = T4, anchor: Anchor = ANCHOR) -> dict:
    """The ``estimate`` block of a latency JSON: per-batch projected latency and throughput, clearly labelled."""
    eff = calibrate(anchor, target)
    rows = []
    for b in batches:
        ms, bound = roofline_ms(cost["flops_per_image"], cost["weight_bytes"], cost["activation_bytes_per_image"],
                                b, eff, target)
        rows.append({"batch": b, "latency_ms": round(ms, 4), "throughput_ips": round(b / ms * 1e3, 1), "bound": bound})
    return {
        "label": LABEL,
        "target": f"{target.name}, TensorRT FP16",
        "method": "roofline t(b) = max(b*F/(e*P), (W + b*A)/(e*B)); F = FLOPs/image (FlopCounterMode), "
                  "W = FP16 weight bytes, A = FP16 activation bytes/image (conv/matmul/attention outputs, "
                  "written + read), e calibrated on the anchor",
        "caveats": "not a measurement; ignores kernel-launch and sync overheads (batch-1 figures are a lower bound); "
                   "assumes the anchor's efficiency holds for this architecture",
        "peak_flops": target.peak_flops, "bandwidth_Bps": target.bandwidth, "target_source": target.source,
        "efficiency": round(eff, 4),
        "anchor": asdict(anchor),
        "int8_reference": INT8_REFERENCE,
        "model_cost": {k: cost[k] for k in ("flops_per_image", "weight_bytes", "activation_bytes_per_image")},
        "batches": rows,
    }


def format_estimate(estimate: dict) -> str:
    """The projection as text, headed with its label."""
    a = estimate["anchor"]
    lines = [f"=== {estimate['target']}: {estimate['label']} ===",
             f"roofline at {estimate['efficiency']:.1%} of peak, calibrated on {a['model']} "
             f"{a['throughput_ips']:.0f} images/s ({a['precision']}; {a['source']})"]
    for r in estimate["batches"]:
        lines.append(f"batch {r['batch']}: {r['latency_ms']:.3f} ms, {r['throughput_ips']:.0f} images/s "
                     f"({r['bound']}-bound) -- {LABEL}")
    return "\n".join(lines)
