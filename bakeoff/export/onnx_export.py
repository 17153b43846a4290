"""A run's checkpoint -> ``RUNS/<pair>/export/model.onnx``: fp32, eval, dynamic batch, fixed image size, logits.

Exporter: torch's dynamo exporter (``torch.export`` + onnxscript), at opset 18 (LayerNormalization is one node
from opset 17 on, TensorRT #2781). Both exporters were tried on the three families here: the TorchScript
exporter (``dynamo=False``) is faster and can target opset 17, but its graphs alias initializers through
Identity nodes and compute the attention scale through Cast(Shape) (open_clip), which breaks
onnxconverter_common's FP16 conversion, and the FP16 CLIP graph it yields crashes onnxruntime's CPU graph
optimizer (segfault at ORT_ENABLE_ALL). The dynamo graphs convert cleanly; they stay at opset 18 because the
onnx version converter cannot take their ReduceMean (axes as an input) down to 17. The dynamo exporter can bake
the batch axis static (pytorch #157621), so ``check_onnx`` requires a symbolic batch dim and runs the graph at
two batch sizes.

timm models are rebuilt under ``set_layer_config(exportable=True)``, so their attention is the explicit
matmul/softmax form rather than fused SDPA. DINOv2's position embedding was resized once when the run's model
was built (train.weights), so the graph has a fixed spatial size and no interpolation: any Resize node fails.

Model metadata (``metadata_props``, JSON values): pair, family, backbone, weights kind, source checkpoint
sha256, dataset hash, tags, thresholds, groups (the softmax groups as lists of tag names; ``[]`` for a run
without groups), preprocessing, the rule that turns the output into tags (``output``), exporter. The graph's
output stays the logits: the rule (softmax + arg-max within each group, sigmoid + threshold elsewhere,
:class:`train.decision.Decision`) is applied by whoever reads them, from this metadata or thresholds.json.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from bakeoff.common.io import atomic_path, sha256_file
from bakeoff.train.data.dataset import Dataset
from bakeoff.train.decision import Decision
from bakeoff.train.run import MODEL, load_run

OPSET = 18
INPUT, OUTPUT = "images", "logits"
EXPORT_DIR, ONNX_FP32, ONNX_FP16, PARITY = "export", "model.onnx", "model.fp16.onnx", "parity.json"
METADATA_KEYS = ("pair", "family", "backbone", "weights_kind", "source_sha256", "dataset_hash", "tags",
                 "thresholds", "groups", "preprocess", "output", "exporter")
JSON_KEYS = ("tags", "thresholds", "groups", "preprocess")
OUTPUT_RULE = {
    False: "logits; probability = sigmoid(logit); a tag is predicted when probability >= its threshold",
    True: "logits; the tags of each group in 'groups' (one single-valued field each): score = softmax of the "
          "group's logits, the group's arg-max tag is predicted (its threshold is not used); every other tag: "
          "score = sigmoid(logit), predicted when score >= its threshold",
}
INTERPOLATION_OPS = ("Resize", "Upsample")


class ExportError(RuntimeError):
    """An exported graph that breaks the export contract; the message names the file and the problem."""


def onnx_metadata(config: dict, decision: Decision | np.ndarray, source_sha256: str) -> dict[str, str]:
    """The ``metadata_props`` of a run's ONNX (values are strings; structured ones JSON); ``decision`` is the
    run's rule (plain thresholds: one without groups)."""
    decision = decision if isinstance(decision, Decision) else Decision(np.asarray(decision, dtype=np.float64))
    taxonomy = config["taxonomy"]
    prep = config["preprocess"]
    meta = {
        "pair": config["pair"], "family": config["family"], "backbone": config["backbone"]["name"],
        "weights_kind": config["weights"]["kind"], "source_sha256": source_sha256,
        "dataset_hash": config["dataset"]["hash"],
        "tags": json.dumps(config["taxonomy"]),
        "thresholds": json.dumps([float(t) for t in decision.thresholds]),
        "groups": json.dumps([[taxonomy[j] for j in g] for g in decision.groups]),
        "preprocess": json.dumps({k: prep[k] for k in ("img_size", "mean", "std", "resize", "cache_size", "input")}),
        "output": OUTPUT_RULE[bool(decision.groups)],
        "exporter": f"torch {torch.__version__} dynamo exporter, opset {OPSET}",
    }
    if config["weights"].get("warning"):
        meta["weights_warning"] = config["weights"]["warning"]
    return meta


def read_metadata(path: str | Path) -> dict:
    """An exported model's metadata with JSON values decoded."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    for key in JSON_KEYS:
        if key in props:
            props[key] = json.loads(props[key])
    return props


def metadata_decision(meta: dict) -> Decision:
    """The rule recorded in :func:`read_metadata`'s result; a model exported before groups existed has none
    (per-tag sigmoid thresholds)."""
    return Decision.from_json({"thresholds": meta["thresholds"], "tags": meta["tags"],
                               "groups": meta.get("groups", [])})


def _trace(model: torch.nn.Module, img_size: int) -> onnx.ModelProto:
    example = torch.zeros(2, 3, img_size, img_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # exporter progress lines
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    optimize=True, verbose=False)
    proto = program.model_proto
    for node in proto.graph.node:  # per-node stack traces carry local paths: keep the file reproducible
        del node.metadata_props[:]
    return proto


def export_onnx(run_dir: str | Path, out: str | Path | None = None, ds: Dataset | None = None) -> Path:
    """Export complete run ``run_dir`` to ``out`` (default ``run_dir/export/model.onnx``), atomically."""
    from timm.layers import set_layer_config

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / EXPORT_DIR / ONNX_FP32
    with set_layer_config(exportable=True):  # timm: explicit attention instead of fused SDPA
        model, config, decision = load_run(run_dir, ds)
    proto = _trace(model.float().eval(), config["preprocess"]["img_size"])
    proto.doc_string = (f"{config['pair']} tagging model: {INPUT} float32 N x 3 x S x S, normalised "
                        f"-> {OUTPUT} float32 N x {len(config['taxonomy'])}")
    onnx.helper.set_model_props(proto, onnx_metadata(config, decision, sha256_file(run_dir / MODEL)))
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    return out


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str:
    return d.dim_param or d.dim_value


def check_onnx(path: str | Path, n_tags: int | None = None) -> dict:
    """Validate an exported model; returns a summary. Raises ``ExportError`` (or onnx's checker error).

    Full ONNX check; one float input N x 3 x S x S with a symbolic N; one output N x T; no interpolation node;
    the metadata keys present; onnxruntime runs it at batch sizes 1 and 3.
    """
    import onnxruntime as ort

    path = Path(path)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    (inp,), (out,) = model.graph.input, model.graph.output
    in_shape = [_dim(d) for d in inp.type.tensor_type.shape.dim]
    out_shape = [_dim(d) for d in out.type.tensor_type.shape.dim]
    if len(in_shape) != 4 or in_shape[1] != 3 or not isinstance(in_shape[0], str):
        raise ExportError(f"{path}: input {inp.name} has shape {in_shape}; expected [batch, 3, S, S] with a symbolic "
                          f"batch dim (a static one means the exporter baked it, pytorch #157621)")
    if len(out_shape) != 2 or not isinstance(out_shape[0], str) or (n_tags and out_shape[1] != n_tags):
        raise ExportError(f"{path}: output {out.name} has shape {out_shape}; expected [batch, {n_tags or 'T'}]")
    ops = Counter(n.op_type for n in model.graph.node)
    interpolation = [n.name for n in model.graph.node if n.op_type in INTERPOLATION_OPS]
    if interpolation:
        raise ExportError(f"{path}: interpolation nodes {interpolation[:3]} in the graph; the position embedding must "
                          f"be resized once at build time and the graph exported at a fixed size")
    missing = [k for k in METADATA_KEYS if k not in {p.key for p in model.metadata_props}]
    if missing:
        raise ExportError(f"{path}: metadata lacks {missing}")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.zeros((batch, *in_shape[1:]), dtype=np.float32)
        (y,) = session.run([out.name], {inp.name: x})
        if y.shape != (batch, out_shape[1]):
            raise ExportError(f"{path}: a batch of {batch} gave logits of shape {y.shape}; the batch axis is not dynamic")
    return {"file": path.name, "sha256": sha256_file(path), "mb": round(path.stat().st_size / 1e6, 2),
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "input": {"name": inp.name, "shape": in_shape}, "output": {"name": out.name, "shape": out_shape},
            "nodes": sum(ops.values()), "ops": dict(sorted(ops.items()))}
