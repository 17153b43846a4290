"""Read a runs directory's artifacts (files only, no model code): configs, timings, evaluations, latencies, exports.

Every number the report shows is a :class:`Sourced` value: it remembers the file it came from (relative to the
runs directory) and the field inside it, so that ``summary.json`` traces each figure back to an artifact.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bakeoff.common.io import read_json, sha256_file
from bakeoff.common.timing import TIMING_TOTALS, phase_seconds, training_seconds
from bakeoff.evaluate.metrics import SCORE_RULE
from bakeoff.train.data.dataset import Dataset, load_dataset
from bakeoff.train.decision import Decision

CONFIG, TIMING, THRESHOLDS, MODEL, HISTORY = ("config.json", "timing.json", "thresholds.json", "model.safetensors",
                                              "history.jsonl")
EVAL, METRICS, PER_TAG, PREDICTIONS = "eval", "metrics.json", "per_tag.csv", "predictions.npy"
LATENCY, EXPORT, PARITY, SIDECAR = "latency", "export", "parity.json", ".engine.json"  # model.<gpu>.fp16.engine.json
REFERENCE_EVAL = "torch"  # PyTorch fp32: the accuracy every other evaluation is compared with
RUNTIMES = ("torch", "onnxruntime", "tensorrt")
DEFAULT_PRECISION = {"torch": "fp32", "onnxruntime": "fp32", "tensorrt": "fp16"}  # = engines.bench.DEFAULT_PRECISION
PRECISIONS = ("fp32", "fp16", "bf16")
FAMILIES = ("cnn", "dinov2", "clip")
STRATEGIES = ("probe", "ft")
BUCKETS_TITLE = {"tail": "long tail", "medium": "medium", "head": "head"}  # evaluate.metrics.BUCKETS
# How far an exported or reduced-precision evaluation's test macro-F1 may differ from PyTorch fp32's, by the
# evaluation's precision (bf16 is held to the reduced-precision limit of fp16). Beyond it the report flags it.
MACRO_F1_TOLERANCE = {"fp32": 0.002, "fp16": 0.005, "bf16": 0.005}
NO_ENGINE = "no TensorRT engine was built, which needs TensorRT and an NVIDIA GPU"


def run_name(runtime: str, precision: str | None = None) -> str:
    """The name evaluate and bench give a (runtime, precision): ``eval/<name>/``, ``latency/<name>.json``."""
    return runtime if precision in (None, DEFAULT_PRECISION.get(runtime)) else f"{runtime}-{precision}"


def parse_run_name(name: str) -> tuple[str, str | None]:
    """``onnxruntime-fp16`` -> (onnxruntime, fp16); ``tensorrt`` -> (tensorrt, fp16, its default precision)."""
    runtime, _, precision = name.partition("-")
    return runtime, precision or DEFAULT_PRECISION.get(runtime)


def parity_eval_name(candidate: str) -> str:
    """The evaluation that scores a parity.json candidate: onnx_fp32 -> onnxruntime, onnx_fp16 ->
    onnxruntime-fp16, tensorrt_fp16 -> tensorrt."""
    runtime, _, precision = candidate.rpartition("_")
    return run_name("onnxruntime" if runtime == "onnx" else runtime, precision)


def export_eval_name(file_name: str) -> str | None:
    """The evaluation that scores an exported model: model.onnx -> onnxruntime, model.fp16.onnx ->
    onnxruntime-fp16, model.<gpu>.<precision>.engine -> tensorrt[-<precision>]; None for other files."""
    if file_name.endswith(".engine"):
        return run_name("tensorrt", file_name.rsplit(".", 2)[-2])
    if file_name.endswith(".onnx"):
        return run_name("onnxruntime", "fp16" if file_name.endswith(".fp16.onnx") else "fp32")
    return None


class ReportError(RuntimeError):
    """Artifacts that cannot be reported as asked; the message names the file and the problem."""


@dataclass(frozen=True)
class Sourced:
    """A value read from an artifact: ``source`` is the file (relative to the runs directory), ``field`` the key."""

    value: Any
    source: str
    field: str

    def to_json(self) -> dict:
        return {"value": self.value, "source": self.source, "field": self.field}


def dig(doc: Any, path: str) -> Any:
    """``doc["a"]["b"][0]`` for ``path == "a.b.0"``; None where any step is missing."""
    for key in path.split("."):
        if isinstance(doc, dict):
            doc = doc.get(key)
        elif isinstance(doc, list) and key.isdigit() and int(key) < len(doc):
            doc = doc[int(key)]
        else:
            return None
    return doc


@dataclass
class Document:
    """One JSON artifact: its path relative to the runs directory and its content."""

    rel: str
    doc: dict

    def get(self, path: str) -> Sourced:
        return Sourced(dig(self.doc, path), self.rel, path)


@dataclass
class Evaluation(Document):
    """``RUNS/<pair>/eval/<name>/``: metrics.json (+ per_tag.csv and predictions.npy once scored)."""

    pair: str = ""
    name: str = ""
    dir: Path = field(default_factory=Path)

    @property
    def scored(self) -> bool:
        return self.doc.get("status") == "scored"

    @property
    def label(self) -> str:
        return runtime_label(self.doc.get("runtime", self.name), self.doc.get("precision"))

    @cached_property
    def per_tag(self) -> list[dict]:
        """per_tag.csv rows with numbers parsed (empty cells, i.e. undefined values, are None)."""
        path = self.dir / PER_TAG
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        numeric = ("support", "predicted", "train_count", "threshold", "precision", "recall", "f1", "ap")
        return [{k: (None if v == "" else float(v)) if k in numeric else v for k, v in r.items()} for r in rows]

    def predictions(self) -> np.ndarray:
        """Test scores (N_test x T, rows in test-split order; softmax within the run's groups, sigmoid elsewhere),
        checked against metrics.json's shape."""
        path = self.dir / PREDICTIONS
        try:
            probs = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ReportError(f"{path}: cannot be read ({e}); re-evaluate the run") from e
        expected = (self.doc["test"]["n_images"], self.doc["n_tags"])
        if probs.shape != expected:
            raise ReportError(f"{path}: shape {probs.shape}, but {self.dir / METRICS} describes {expected}; "
                              "re-evaluate the run")
        return probs

    def decision(self) -> Decision:
        """The run's rule (thresholds.json as a :class:`Decision`: arg-max within each softmax group, score >=
        threshold elsewhere; a file without groups is per-tag thresholds only)."""
        path = self.dir.parents[1] / THRESHOLDS
        doc = read_json(path)
        try:
            decision = Decision.from_json(doc, None if "tags" in doc else
                                          dig(read_json(self.dir.parents[1] / CONFIG), "taxonomy"))
        except (KeyError, ValueError) as e:
            raise ReportError(f"{path}: not a valid decision rule ({e}); retrain or re-evaluate the run") from e
        if decision.n_tags != self.doc["n_tags"]:
            raise ReportError(f"{path}: {decision.n_tags} thresholds for {self.doc['n_tags']} tags in "
                              f"{self.dir / METRICS}; re-evaluate the run")
        return decision

    def decisions(self) -> np.ndarray:
        """Test predictions as tag decisions by the run's rule (:meth:`decision`; an evaluation scored with other
        thresholds or another checkpoint is stale and never gets here, see ``_evaluations``)."""
        return self.decision().apply(np.asarray(self.predictions()))

    def bucket_mask(self, bucket: str) -> np.ndarray:
        """Tags in ``bucket`` (tail / medium / head by training frequency), from per_tag.csv."""
        return np.array([r["bucket"] == bucket for r in self.per_tag])


@dataclass
class Latency(Document):
    """One benchmark (``latency/<runtime>[-<precision>].json``), or the T4 projection stored in one (``estimate``)."""

    pair: str = ""
    name: str = ""
    estimate: bool = False

    @property
    def prefix(self) -> str:
        return "estimate." if self.estimate else ""

    @property
    def runtime(self) -> str:
        return "tensorrt" if self.estimate else self.doc["runtime"]

    @property
    def precision(self) -> str:
        return "fp16" if self.estimate else self.doc["precision"]

    @property
    def eval_name(self) -> str:
        """The evaluation of the runtime and precision this latency is for (an estimate: TensorRT fp16's)."""
        return run_name(self.runtime, self.precision)

    @property
    def label(self) -> str:
        return "T4 ESTIMATE (TensorRT fp16)" if self.estimate else runtime_label(self.runtime, self.precision)

    @property
    def device(self) -> str:
        return f"{self.doc['estimate']['target']} (ESTIMATE, not measured)" if self.estimate else self.doc["device"]

    @property
    def versions(self) -> dict:
        return self.doc.get("versions") or {}

    @property
    def definition(self) -> str | None:
        """What "latency" measured (GPU: H2D + compute + D2H from CUDA events; CPU: one predict call's wall time);
        None for an estimate or a benchmark that predates recording it."""
        return None if self.estimate else self.doc.get("latency_definition")

    @property
    def on_t4(self) -> bool:
        """Measured on a T4 (an estimate never is)."""
        return not self.estimate and bool(self.doc.get("is_t4"))

    @property
    def contended(self) -> bool:
        """A CPU benchmark during which other processes used the cores (its figures are pessimistic)."""
        if self.estimate:
            return False
        others = self.doc.get("cpu_contention")
        if others is not None:
            return bool(others["contended"])
        load = self.doc.get("load_average_1m")  # benchmarks written before cpu_contention: a laggy proxy
        return bool(load) and max(load["before"], load["after"]) > load["cpus"]

    def _batches(self) -> list[dict]:
        return dig(self.doc, self.prefix + "batches") or []

    def _index(self, batch: int | None) -> int | None:
        """Position of ``batch`` in the benchmark (None: the largest batch); None when it was not run."""
        sizes = [r["batch"] for r in self._batches()]
        if batch is None:
            batch = max(sizes, default=None)
        return sizes.index(batch) if batch in sizes else None

    def latency_ms(self, stat: str, batch: int = 1) -> Sourced:
        """``stat`` (median, p99, ...) latency at ``batch``; an estimate has one figure for every statistic."""
        i = self._index(batch)
        if i is None:
            return Sourced(None, self.rel, f"{self.prefix}batches[batch={batch}]")
        return self.get(f"{self.prefix}batches.{i}.latency_ms" + ("" if self.estimate else f".{stat}"))

    def throughput(self) -> tuple[Sourced, int | None]:
        """Images/s at the largest batch benchmarked, and that batch."""
        i = self._index(None)
        if i is None:
            return Sourced(None, self.rel, f"{self.prefix}batches"), None
        return self.get(f"{self.prefix}batches.{i}.throughput_ips"), self._batches()[i]["batch"]


@dataclass
class Pair:
    """One run directory and every artifact found in it."""

    name: str
    dir: Path
    config: Document
    timing: Document | None
    evals: dict[str, Evaluation]
    latencies: list[Latency]
    export: dict[str, Sourced]  # model file name -> size in bytes; parity.json and engine sidecars -> content
    stale: dict[str, str] = field(default_factory=dict)  # evaluations of an earlier version of the run (left out):
    # name -> the run files that changed since it was scored

    @property
    def family(self) -> str:
        return self.config.doc.get("family", self.name.split("-")[0])

    @property
    def strategy(self) -> str:
        return self.config.doc.get("strategy", self.name.rsplit("-", 1)[-1])

    @property
    def complete(self) -> bool:
        return self.config.doc.get("status") == "complete"

    @property
    def random_init(self) -> bool:
        return dig(self.config.doc, "weights.kind") == "random"

    @property
    def phases(self) -> dict[str, float]:
        """Training seconds per phase (timing.json; empty without one)."""
        return phase_seconds(self.timing.doc) if self.timing is not None else {}

    def training_time(self) -> Sourced | None:
        """This run's own training time: the sum of its phases (see :func:`phase_seconds`)."""
        if self.timing is None:
            return None
        return Sourced(training_seconds(self.timing.doc), self.timing.rel,
                       f"sum of seconds.* (all but {', '.join(TIMING_TOTALS)})")

    @property
    def starts_from_probe(self) -> bool:
        """A fine-tune started from its linear probe's head (LP-then-FT): the probe is part of its cost."""
        return str(dig(self.config.doc, "summary.init_head") or "").startswith("linear probe")

    @property
    def reused_caches(self) -> list[str]:
        """Caches this run found complete: their phases count the compute recorded when they were made."""
        reused = (self.timing.doc.get("caches_reused") or {}) if self.timing is not None else {}
        return [name for name, was in reused.items() if was]

    @cached_property
    def history(self) -> Sourced | None:
        """history.jsonl's records (one per evaluated epoch), None without the file."""
        path = self.dir / HISTORY
        if not path.is_file():
            return None
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except ValueError as e:
            raise ReportError(f"{path}: not valid JSON lines ({e})") from e
        return Sourced(rows, f"{self.name}/{HISTORY}", "epoch, val_map")

    @cached_property
    def parity_failures(self) -> dict[str, Sourced]:
        """Exported models that failed their parity check against PyTorch fp32, by the evaluation that scores them
        (parity.json's results; a TensorRT engine's sidecar ``parity``): what failed, and where it is recorded."""
        failed: dict[str, Sourced] = {}
        parity = self.export.get(PARITY)
        results = (parity.value.get("results") or {}) if parity is not None else {}
        for key, result in results.items():
            if result.get("status") == "failed":
                failed[parity_eval_name(key)] = Sourced(result.get("failures") or [], parity.source,
                                                        f"results.{key}.status")
        for name, side in self.export.items():
            if name.endswith(SIDECAR) and dig(side.value, "parity.status") == "failed":
                failed.setdefault(export_eval_name(name.removesuffix(".json")),
                                  Sourced(dig(side.value, "parity.failures") or [], side.source, "parity.status"))
        return failed

    def exported(self, eval_name: str) -> bool:
        """Whether export/ holds a model file that ``eval_name``'s evaluation would score."""
        return any(export_eval_name(name) == eval_name for name in self.export)

    def evaluation_for(self, lat: Latency) -> Evaluation | None:
        """The evaluation (scored or failed) on the runtime and precision ``lat`` timed, if there is one."""
        return self.evals.get(lat.eval_name)

    @property
    def engines(self) -> list[dict]:
        """The TensorRT engine sidecars (GPU, TensorRT version, compute capability, ...) of the export."""
        return [s.value for name, s in self.export.items() if name.endswith(SIDECAR)]

    @property
    def reference(self) -> Evaluation | None:
        """The scored PyTorch fp32 evaluation of the complete run, if any."""
        ev = self.evals.get(REFERENCE_EVAL)
        return ev if self.complete and ev is not None and ev.scored else None

    def unscored_reason(self) -> str:
        """Why the pair has no usable PyTorch fp32 evaluation."""
        if not self.complete:
            return f"training incomplete (config.json status {self.config.doc.get('status')!r})"
        if REFERENCE_EVAL in self.stale:
            return f"eval/torch is stale ({self.stale[REFERENCE_EVAL]} changed since it was scored): re-evaluate"
        ev = self.evals.get(REFERENCE_EVAL)
        return (f"eval/torch {ev.doc.get('status')}: {ev.doc.get('reason', '')}" if ev is not None
                else "not evaluated (no eval/torch/metrics.json)")

    def measured(self) -> list[Latency]:
        """The benchmarks actually run (not the T4 estimate)."""
        return [lat for lat in self.latencies if not lat.estimate]


RUNTIME_LABELS = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}
FAMILY_LABELS = {"cnn": "CNN", "dinov2": "DINOv2", "clip": "CLIP"}
RANDOM_INIT = " (random init)"  # appended to a pair or backbone name whose weights are random
STRATEGY_LABELS = {"probe": "linear probe", "ft": "fine-tune"}


def runtime_label(runtime: str, precision: str | None = None) -> str:
    return RUNTIME_LABELS.get(runtime, runtime) + (f" {precision}" if precision else "")


def eval_label(name: str) -> str:
    """``onnxruntime-fp16`` -> ONNX Runtime fp16; ``tensorrt`` -> TensorRT fp16 (its default precision)."""
    return runtime_label(*parse_run_name(name))


def pair_label(pair: Pair) -> str:
    """``DINOv2 fine-tune``; the weights' recorded label in place of the family where the run has one (a weights
    file's provenance, e.g. ``DINOv2 ViT-S/14 (derived) fine-tune``)."""
    backbone = dig(pair.config.doc, "weights.label") or FAMILY_LABELS.get(pair.family, pair.family)
    return f"{backbone} {STRATEGY_LABELS.get(pair.strategy, pair.strategy)}"


def macro_f1_delta(ev: Evaluation, ref: Evaluation) -> Sourced:
    """``ev``'s test macro-F1 minus the PyTorch fp32 evaluation ``ref``'s."""
    return Sourced(ev.doc["macro_f1"] - ref.doc["macro_f1"], f"{ev.rel} − {ref.rel}", "macro_f1 (difference)")


def tolerances() -> str:
    """:data:`MACRO_F1_TOLERANCE` in words: ``±0.002 fp32, ±0.005 fp16 / bf16``."""
    by_value: dict[float, list[str]] = {}
    for precision, tol in MACRO_F1_TOLERANCE.items():
        by_value.setdefault(tol, []).append(precision)
    return ", ".join(f"±{tol:g} {' / '.join(names)}" for tol, names in by_value.items())


def outside_tolerance(ev: Evaluation, ref: Evaluation) -> float | None:
    """The tolerance (:data:`MACRO_F1_TOLERANCE`) that scored ``ev``'s macro-F1 difference from ``ref`` exceeds;
    None when within it, or when ``ev`` did not score."""
    tol = MACRO_F1_TOLERANCE.get(ev.doc.get("precision"))
    if not ev.scored or tol is None or abs(macro_f1_delta(ev, ref).value) <= tol:
        return None
    return tol


def training_cost(pair: Pair, pairs: list[Pair]) -> Sourced | None:
    """What it cost to train ``pair``: its own phases, plus its linear probe's when the fine-tune started from
    the probe's head (LP-then-FT). None without timing.json; value None when the probe's time is unknown."""
    own = pair.training_time()
    if own is None or not pair.starts_from_probe:
        return own
    probe = next((p for p in pairs if p.family == pair.family and p.strategy == "probe"), None)
    before = probe.training_time() if probe is not None else None
    if before is None:
        return Sourced(None, own.source, f"{own.field}, plus the linear probe's (no {pair.family}-probe timing)")
    return Sourced(round(own.value + before.value, 3), f"{own.source} + {before.source}", own.field)


def _read(path: Path, runs_dir: Path) -> Document:
    try:
        return Document(path.relative_to(runs_dir).as_posix(), read_json(path))
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from e


RUN_FILES = {"config_sha256": CONFIG, "model_sha256": MODEL, "thresholds_sha256": THRESHOLDS}  # metrics.json run.*
GROUP_SCORES = SCORE_RULE[True]  # metrics.json decision.score of a rule with groups (none recorded: sigmoid scores)


def _evaluations(run_dir: Path, runs_dir: Path) -> tuple[dict[str, Evaluation], dict[str, str]]:
    """(evaluations of the run as it is now, {name: what changed} of stale ones: scored before the run's
    config.json, checkpoint or thresholds last changed, or whose saved scores are sigmoid probabilities (scored
    before groups existed) while the run's rule has softmax groups). Each run file is hashed once."""
    now = {key: sha256_file(run_dir / name) if (run_dir / name).is_file() else None for key, name in RUN_FILES.items()}
    grouped = (run_dir / THRESHOLDS).is_file() and bool(read_json(run_dir / THRESHOLDS).get("groups"))
    found, stale = {}, {}
    for d in sorted((run_dir / EVAL).glob(f"*/{METRICS}")):
        doc = _read(d, runs_dir)
        changed = [name for key, name in RUN_FILES.items() if dig(doc.doc, f"run.{key}") != now[key]]
        if (not changed and grouped and doc.doc.get("status") == "scored"
                and dig(doc.doc, "decision.score") != GROUP_SCORES):
            changed = [f"{THRESHOLDS} (its groups)"]
        if changed:
            stale[d.parent.name] = ", ".join(changed)
            continue
        found[d.parent.name] = Evaluation(doc.rel, doc.doc, pair=run_dir.name, name=d.parent.name, dir=d.parent)
    return found, stale


def _latencies(run_dir: Path, runs_dir: Path) -> list[Latency]:
    """Measured benchmarks, plus one T4 estimate (the first found) when no TensorRT benchmark was measured."""
    found = []
    for path in sorted((run_dir / LATENCY).glob("*.json")):
        doc = _read(path, runs_dir)
        found.append(Latency(doc.rel, doc.doc, pair=run_dir.name, name=path.stem))
    if not any(lat.runtime == "tensorrt" for lat in found):
        est = next((lat for lat in found if lat.doc.get("estimate")), None)
        if est is not None:
            found.append(Latency(est.rel, est.doc, pair=run_dir.name, name="tensorrt-estimate", estimate=True))
    return found


def _export(run_dir: Path, runs_dir: Path) -> dict[str, Sourced]:
    found: dict[str, Sourced] = {}
    for path in sorted((run_dir / EXPORT).glob("*")):
        rel = path.relative_to(runs_dir).as_posix()
        if path.name == PARITY or path.name.endswith(SIDECAR):
            found[path.name] = Sourced(_read(path, runs_dir).doc, rel, "")
        elif path.is_file() and path.suffix in (".onnx", ".engine"):
            found[path.name] = Sourced(path.stat().st_size, rel, "file size (bytes)")
    return found


def load_pairs(runs_dir: str | Path) -> list[Pair]:
    """Every run directory (one holding config.json) under ``runs_dir``, family then strategy order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"{runs_dir}: not a runs directory")
    pairs = []
    for d in sorted(runs_dir.iterdir()):
        if d.name.startswith(".") or not (d / CONFIG).is_file():
            continue
        evals, stale = _evaluations(d, runs_dir)
        pairs.append(Pair(d.name, d, _read(d / CONFIG, runs_dir),
                          _read(d / TIMING, runs_dir) if (d / TIMING).is_file() else None,
                          evals, _latencies(d, runs_dir), _export(d, runs_dir), stale))
    if not pairs:
        raise ReportError(f"{runs_dir}: no run directories (none holds a {CONFIG}); train first")
    return sorted(pairs, key=order_key)


def order_key(pair: Pair) -> tuple:
    fam = FAMILIES.index(pair.family) if pair.family in FAMILIES else len(FAMILIES)
    strat = STRATEGIES.index(pair.strategy) if pair.strategy in STRATEGIES else len(STRATEGIES)
    return fam, pair.family, strat, pair.name


def ids_sha256(ids: list[str]) -> str:
    """The hash evaluate records for the test rows (``test.ids_sha256`` in metrics.json, evaluate.score.ids_sha256)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


@dataclass(frozen=True)
class HeldOutLabels:
    """The test split's labels, with the hashes that tie predictions.npy files to them."""

    dataset: Dataset
    y_true: np.ndarray
    ids_sha256: str
    content_hash: str

    @classmethod
    def load(cls, root: str | Path) -> HeldOutLabels:
        ds = load_dataset(root)
        rows = ds.split_indices("test")
        return cls(ds, ds.labels()[rows], ids_sha256([ds.ids[i] for i in rows]), ds.content_hash())

    def matches(self, ev: Evaluation) -> bool:
        return (dig(ev.doc, "dataset.hash"), dig(ev.doc, "test.ids_sha256")) == (self.content_hash, self.ids_sha256)
