"""End-to-end parity of exported models against the run's PyTorch model, on real test images.

The reference is the run's model in PyTorch fp32 on the CPU; each candidate (ONNX fp32 and fp16 through
onnxruntime's CPUExecutionProvider, the TensorRT engine where one is built) sees the same N test images from
the dataset's image cache, preprocessed as in training. Reported per candidate: max and mean |delta logit|,
max |delta probability| (the run's scores, ``decision.scores``: softmax within each group, sigmoid elsewhere),
and the fraction of (image, tag) decisions that flip under the run's rule (thresholds.json as a
:class:`train.decision.Decision`: arg-max within each group, the tuned thresholds elsewhere; an arg-max that
moves within a group flips two decisions, the tag it leaves and the tag it takes) (TensorRT #3135: judge parity
end to end, not by max |diff| alone). Outside tolerance the candidate and the report fail; ``parity.json``
records it either way, with the rule it judged by.

onnxruntime on a CPU runs FP16 nodes that lack a CPU kernel in FP32 (it inserts casts), so the fp16 ONNX
figures here bound the conversion's damage from below; the engine's figures are the GPU's own.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bakeoff.common.io import write_json
from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import Dataset
from bakeoff.train.decision import Decision
from bakeoff.train.preprocess import Preprocess


class ParityFailed(RuntimeError):
    """An export whose outputs differ from the PyTorch model's beyond tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """Limits for one precision: decision-flip rate, and max |delta probability| (None: reported, not judged)."""

    max_flip_rate: float
    max_abs_prob: float | None = None


DEFAULT_TOLERANCES = {"fp32": Tolerance(0.001, 1e-3), "fp16": Tolerance(0.005)}


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def as_decision(rule: Decision | np.ndarray) -> Decision:
    """A :class:`Decision`; plain per-tag thresholds are one without groups (the rule p >= t)."""
    return rule if isinstance(rule, Decision) else Decision(np.asarray(rule, dtype=np.float64))


def _scores(decision: Decision, logits: np.ndarray) -> np.ndarray:
    """The scores evaluate saves, ``decision.scores`` (float32), in float64; exp overflow on a huge logit is
    harmless (it saturates to 0 or 1), and NaN logits give NaN scores (``finite`` reports them)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return decision.scores(logits).astype(np.float64)


def compare(reference: np.ndarray, logits: np.ndarray, decision: Decision | np.ndarray) -> dict:
    """Differences between two N x T logit arrays, and decision flips under the run's rule ``decision`` (plain
    thresholds: the rule p >= t): a tag whose decision differs is one flip, so an arg-max that moves within a
    group is two (the tag it leaves and the tag it takes)."""
    if reference.shape != logits.shape:
        raise ValueError(f"logits of shape {logits.shape} against a reference of shape {reference.shape}")
    decision = as_decision(decision)
    if decision.n_tags != reference.shape[1]:
        raise ValueError(f"a rule for {decision.n_tags} tags against logits of {reference.shape[1]} tags")
    d_logit = np.abs(np.asarray(logits, np.float64) - reference)
    p_ref, p = _scores(decision, reference), _scores(decision, logits)
    flips = int((decision.apply(p_ref) != decision.apply(p)).sum())
    return {"max_abs_logit": float(d_logit.max()), "mean_abs_logit": float(d_logit.mean()),
            "max_abs_prob": float(np.abs(p - p_ref).max()), "flips": flips, "decisions": int(reference.size),
            "flip_rate": flips / reference.size, "finite": bool(np.isfinite(logits).all())}


def judge(stats: dict, tol: Tolerance) -> list[str]:
    """What is outside tolerance in ``compare``'s result (empty when within)."""
    failures = []
    if not stats["finite"]:
        failures.append("non-finite logits")
    if stats["flip_rate"] > tol.max_flip_rate:
        failures.append(f"{stats['flips']} of {stats['decisions']} decisions flip ({stats['flip_rate']:.3%} > "
                        f"{tol.max_flip_rate:.3%})")
    if tol.max_abs_prob is not None and stats["max_abs_prob"] > tol.max_abs_prob:
        failures.append(f"max |delta prob| {stats['max_abs_prob']:.2e} > {tol.max_abs_prob:.0e}")
    return failures


def parity_rows(ds: Dataset, n: int) -> np.ndarray:
    """``n`` test rows spread evenly over the test split (all of them when it is smaller)."""
    rows = ds.split_indices("test")
    if n >= len(rows):
        return rows
    return rows[np.linspace(0, len(rows) - 1, n).round().astype(int)]


def parity_inputs(ds: Dataset, config: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, float32 N x 3 x S x S contiguous inputs) from the image cache, preprocessed as in training."""
    rows = parity_rows(ds, n)  # sorted: memmap reads in file order
    images = load_cache(ds, config["preprocess"]["cache_size"])
    x = Preprocess.from_config(config["preprocess"])(np.asarray(images[rows]))
    return rows, np.ascontiguousarray(x.numpy())


@torch.no_grad()
def torch_logits(model: torch.nn.Module, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(inputs[i:i + batch_size])).float().numpy()
                           for i in range(0, len(inputs), batch_size)])


def ort_logits(path: str | Path, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Logits of an ONNX file through onnxruntime's CPUExecutionProvider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)]).astype(np.float32)


def describe_rule(decision: Decision) -> dict:
    """parity.json's record of the rule the flips were counted by."""
    grouped = bool(decision.groups)
    return {"rule": "group tags: arg-max within the field; other tags: score >= threshold" if grouped
            else "score >= threshold",
            "score": "softmax within each group, sigmoid elsewhere" if grouped else "sigmoid(logit)",
            "n_groups": len(decision.groups), "n_group_tags": int((~decision.free_mask()).sum())}


def parity_report(reference: np.ndarray, candidates: dict[str, dict], decision: Decision | np.ndarray,
                  tolerances: dict[str, Tolerance] = DEFAULT_TOLERANCES, *, group_tags: list[list[str]] | None = None,
                  **info) -> dict:
    """The parity.json content. ``candidates``: name -> {"logits", "precision", and any details to record};
    ``decision``: the run's rule (plain thresholds: one without groups), recorded as ``decision`` with
    ``group_tags`` (the groups' tag names) when given."""
    decision = as_decision(decision)
    rule = describe_rule(decision) | ({"groups": group_tags} if group_tags is not None else {})
    results, failures = {}, []
    for name, cand in candidates.items():
        stats = compare(reference, cand["logits"], decision)
        problems = judge(stats, tolerances[cand["precision"]])
        details = {k: v for k, v in cand.items() if k != "logits"}
        results[name] = {**details, **stats, "status": "failed" if problems else "passed", "failures": problems}
        failures += [f"{name}: {p}" for p in problems]
    return {"status": "failed" if failures else "passed", **info, "n_images": int(len(reference)),
            "n_tags": int(reference.shape[1]), "reference": "PyTorch fp32 on CPU (the run's model)",
            "decision": rule,
            "tolerances": {k: asdict(v) for k, v in tolerances.items()}, "results": results, "failures": failures,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_parity(path: str | Path, report: dict) -> None:
    """Write ``report`` and raise ``ParityFailed`` when its status is failed."""
    write_json(path, report)
    if report["status"] != "passed":
        raise ParityFailed(f"{path}: parity failed: {'; '.join(report['failures'])}")
