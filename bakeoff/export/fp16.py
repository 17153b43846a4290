"""FP16 ONNX with the overflow-prone ops kept in FP32 (LayerNorm, Softmax, a decomposed LayerNorm's parts).

FP16 LayerNorm overflow wrecks ViT accuracy (timm CLIP ViT-B/32 F1 0.85 -> 0.15, TensorRT #2709), so the
conversion (onnxconverter_common's ``convert_float_to_float16``) blocks those ops: they compute in FP32 behind
Cast nodes, everything else in FP16; inputs and outputs stay float32 (``keep_io_types``). The result is
checked by type inference: every blocked op must read FP32, and the count of FP32-kept and FP16 nodes is
reported. This file is also what a TensorRT 11 (strongly typed) build consumes.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

from bakeoff.common.io import atomic_path

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")
FP16_MIN, FP16_MAX = 5.96e-8, 65504.0  # smallest subnormal, largest finite


class Fp16Error(RuntimeError):
    """The FP16 graph computes a kept-FP32 op in FP16, or could not be built."""


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, after type inference."""
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def precision_summary(model: onnx.ModelProto, kept_ops: tuple[str, ...] = FP32_OPS) -> dict:
    """Per op type, how many nodes compute in FP32 / FP16 (the dtype of a node's first input), and casts.

    ``violations`` lists nodes of ``kept_ops`` that read FP16: there must be none.
    """
    types = _elem_types(model)
    fp32, fp16, violations = Counter(), Counter(), []
    for node in model.graph.node:
        if node.op_type == "Cast" or not node.input:
            continue
        dtype = types.get(node.input[0])
        if dtype == TensorProto.FLOAT:
            fp32[node.op_type] += 1
        elif dtype == TensorProto.FLOAT16:
            fp16[node.op_type] += 1
            if node.op_type in kept_ops:
                violations.append(node.name or node.op_type)
    return {"fp32_nodes": dict(sorted(fp32.items())), "fp16_nodes": dict(sorted(fp16.items())),
            "kept_fp32": {op: fp32[op] for op in kept_ops if fp32[op]},
            "casts": sum(n.op_type == "Cast" for n in model.graph.node), "violations": violations}


def convert_fp16(src: str | Path, dst: str | Path, kept_ops: tuple[str, ...] = FP32_OPS) -> dict:
    """Write the FP16 version of ONNX ``src`` to ``dst`` (atomically); returns its ``precision_summary``.

    Raises ``Fp16Error`` when a kept op ends up reading FP16. Model metadata is carried over, plus ``precision``.
    """
    from onnxconverter_common import float16

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):  # the converter names its casts after nodes: no blanks
        node.name = node.name or f"{node.op_type}_{i}"
    with warnings.catch_warnings(record=True) as clamped:  # one "number will be truncated" per clamped value
        warnings.simplefilter("always", UserWarning)
        half = float16.convert_float_to_float16(
            model, min_positive_val=FP16_MIN, max_finite_val=FP16_MAX, keep_io_types=True,
            op_block_list=sorted({*float16.DEFAULT_OP_BLOCK_LIST, *kept_ops}))
    summary = precision_summary(half, kept_ops)
    if summary["violations"]:
        raise Fp16Error(f"{dst}: ops meant to stay FP32 read FP16 after conversion: {summary['violations'][:5]}")
    summary["values_clamped_to_fp16_range"] = sum(issubclass(w.category, UserWarning) for w in clamped)
    meta = {p.key: p.value for p in half.metadata_props}
    meta["precision"] = f"fp16 compute, float32 I/O; kept in fp32: {', '.join(kept_ops)}"
    onnx.helper.set_model_props(half, meta)
    with atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))
    return summary
