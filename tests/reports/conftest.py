"""A fabricated but consistent runs directory: six pairs on a tiny label-only dataset, every artifact written by
the real writers (evaluate.score, engines.bench, engines.projection, export.parity) from synthetic predictions.

The scenario (``QUALITY`` sets how well each pair's predictions separate positives from negatives):

- dinov2-ft is the most accurate pair and the slowest (p99 ~80 ms at batch 1 on the CPU);
- clip-ft is as good as clip-probe (other noise): the two cannot be separated; clip-probe trains faster;
- cnn-probe uses random-init weights; cnn-ft has no latency benchmark at all;
- clip-probe has a TensorRT benchmark on a T4 and a TensorRT evaluation, dinov2-probe a T4 ESTIMATE and a
  TensorRT evaluation, everything else runs on a CPU;
- ONNX Runtime evaluations for clip-ft and dinov2-ft, failed fp16 ones (NaN outputs) for both cnn pairs (cnn-probe
  is benchmarked on it too, and that is its fastest runtime); dinov2-ft is fastest on ONNX Runtime fp16, which
  was never evaluated; clip-ft's ONNX Runtime fp16 evaluation is outside the export tolerance of PyTorch fp32;
- parity (and model.onnx, model.fp16.onnx) for the clip-ft and dinov2-ft exports: dinov2-ft's ONNX fp32 graph
  FAILED it (its fp16 one passed);
- every run trained on a subset (N_TRAIN_USED) of the train split; the fine-tunes ran 3 epochs: dinov2-ft's best
  epoch is its last, clip-ft's is not, cnn-ft has no history.jsonl; the probes swept 4 settings for 10 epochs;
- timing.json: the phases sum to TRAIN_SECONDS; dinov2-probe's total was recorded the way older runs did (it
  reused its feature cache, and its total leaves that phase out).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

TAIL, HEAD = 20, 90
CPU = "Intel(R) Xeon(R) Processor (2 threads)"
QUALITY = {"cnn-probe": 0.4, "cnn-ft": 0.7, "dinov2-probe": 1.2, "dinov2-ft": 2.6, "clip-probe": 1.6, "clip-ft": 1.6}
TRAIN_SECONDS = {"cnn-probe": 50, "cnn-ft": 200, "dinov2-probe": 90, "dinov2-ft": 400, "clip-probe": 70, "clip-ft": 300}
# pair -> [(runtime, precision, device, ms per call at batch 1)]
LATENCIES = {
    "cnn-probe": [("torch", "fp32", CPU, 3.0), ("onnxruntime", "fp16", CPU, 2.0)],
    "dinov2-probe": [("torch", "fp32", CPU, 12.0)],
    "dinov2-ft": [("torch", "fp32", CPU, 80.0), ("onnxruntime", "fp16", CPU, 50.0)],
    "clip-probe": [("torch", "fp32", CPU, 8.0), ("tensorrt", "fp16", "Tesla T4", 1.5)],
    "clip-ft": [("onnxruntime", "fp32", CPU, 6.0)],
}
CONTENDED = ("dinov2-ft", "torch")  # another process took 0.8 of the 2 cores during this benchmark
# config.json's training-time versions; cnn-probe's predates recording them (torch only)
TRAINING_VERSIONS = {False: {"versions": {"python": "3.11.7", "torch": "2.14.1", "timm": "0.9.16"}},
                     True: {"torch": "2.14.1"}}
N_TRAIN_USED = 240  # of the train split's 360 images
FT_HISTORY = {"dinov2-ft": [0.40, 0.45, 0.47], "clip-ft": [0.40, 0.44, 0.43]}  # validation mAP per epoch
# config.json summary.selection (validation, what the decision rule chooses on): pair -> (cross-fitted macro-F1,
# cross-fitted long-tail F1, mAP). Same order as the test scores; clip-ft and clip-probe are within 0.005 on
# validation; both cnn pairs' long tails are below 0.1. The mAP is also what older configs record (probe:
# summary.selected.val_map, fine-tune: summary.result.best_val_map).
VALIDATION = {"cnn-probe": (0.20, 0.05, 0.25), "cnn-ft": (0.30, 0.08, 0.33), "dinov2-probe": (0.45, 0.20, 0.41),
              "dinov2-ft": (0.60, 0.30, 0.47), "clip-probe": (0.500, 0.22, 0.42), "clip-ft": (0.503, 0.23, 0.44)}
PROBS = [0.5, 0.45, 0.4, 0.2, 0.15, 0.12, 0.1, 0.09, 0.08,
         0.045, 0.04, 0.035, 0.03, 0.03, 0.025, 0.02, 0.02, 0.02, 0.015, 0.015, 0.015, 0.012, 0.012, 0.01]


def fabricate_dataset(root: Path) -> Path:
    from bakeoff.train.data.dataset import write_dataset
    from bakeoff.train.data.splits import prepare

    rng = np.random.default_rng(0)
    y = rng.random((600, len(PROBS))) < np.array(PROBS)
    taxonomy = [f"tag=t{j:02d}" for j in range(len(PROBS))]
    write_dataset(root, [f"p{i}" for i in range(len(y))], [f"img/{i}.jpg" for i in range(len(y))],
                  [[taxonomy[j] for j in np.flatnonzero(row)] for row in y], taxonomy)
    prepare(root, test_size=150, val_fraction=0.2, seed=0, long_tail_threshold=TAIL, head_threshold=HEAD)
    return root


def pair_probabilities(y: np.ndarray) -> dict[str, np.ndarray]:
    """Sigmoid probabilities per pair: positives pushed up by the pair's quality, plus unit noise."""
    sign = 2.0 * y - 1.0
    logits = {pair: sign * q + np.random.default_rng(k).normal(size=y.shape)
              for k, (pair, q) in enumerate(QUALITY.items())}
    return {pair: (1 / (1 + np.exp(-z))).astype(np.float32) for pair, z in logits.items()}


def write_run(runs: Path, ds, pair: str, random_init: bool) -> Path:
    from bakeoff.common.io import write_json

    family, strategy = pair.split("-")
    run = runs / pair
    run.mkdir(parents=True)
    weights = {"kind": "file", "source": f"/weights/{family}.safetensors", "sha256": "ab" * 32}
    if random_init:
        weights = {"kind": "random", "source": "random", "sha256": None,
                   "warning": "random init — not a valid comparison"}
    n_total = {"cnn": 3_400_000, "dinov2": 22_000_000, "clip": 22_600_000}[family]
    n_trained = 6_000 if strategy == "probe" else n_total // 3
    stats = ds.stats()
    (run / "model.safetensors").write_bytes(b"0" * 1000)
    write_json(run / "thresholds.json", {"thresholds": [0.5] * len(ds.taxonomy), "tags": ds.taxonomy})
    phase = "feature_extraction" if strategy == "probe" else "trunk_caching"
    train = "head_training" if strategy == "probe" else "block_training"
    t = TRAIN_SECONDS[pair]
    seconds = {"weights_load": 0.004 * t, "image_cache": 0.001 * t, phase: 0.64 * t, train: 0.35 * t,
               "thresholds": 0.005 * t}  # the first, second and last are too short to see in Figure 4
    reused = pair == "dinov2-probe"  # recorded as older runs did: the total leaves out the reused cache's cost
    seconds["total"] = seconds[train] + seconds["thresholds"] if reused else sum(seconds.values())
    write_json(run / "timing.json", {"seconds": seconds, "device": CPU, "images": {"train": stats["splits"]["train"]},
                                     "caches_reused": {"features" if strategy == "probe" else "trunk": reused}})
    write_json(run / "config.json", {
        "status": "complete", "pair": pair, "family": family, "strategy": strategy,
        "backbone": {"name": f"{family}_model", "family": family, "library": "timm", "img_size": 224,
                     "label": family.upper()},
        "weights": weights, "preprocess": {"img_size": 224, "cache_size": 256},
        "dataset": {"path": str(ds.root), "hash": ds.content_hash(), "n_images": len(ds),
                    "n_train_used": N_TRAIN_USED, "n_val": stats["splits"]["val"], "split_seed": 0},
        "taxonomy": ds.taxonomy, "device": CPU, **TRAINING_VERSIONS[pair == "cnn-probe"],
        "options": {"epochs": 3, "augment": pair == "clip-ft", "max_train_images": N_TRAIN_USED},
        "summary": summary(pair, strategy) | {"selection": selection(pair, stats["splits"]["val"])},
        "params_trained": n_trained, "params_total": n_total})
    if pair in FT_HISTORY:
        (run / "history.jsonl").write_text("".join(f'{{"epoch": {e}, "val_map": {m}}}\n'
                                                   for e, m in enumerate(FT_HISTORY[pair], 1)))
    return run


def summary(pair: str, strategy: str) -> dict:
    """config.json's summary as train writes it: a fine-tune's schedule and head, or a probe's sweep."""
    if strategy == "ft":
        return {"init_head": "linear probe (runs/x-probe)", "finetune": {"epochs": 3},
                "result": {"epochs": 3, "stopped_early": False, "best_val_map": VALIDATION[pair][2]}}
    sweep = [{"lr": lr, "weight_decay": wd, "val_map": 0.4, "epoch": 10} for lr in (1e-3, 3e-3) for wd in (0, 1e-4)]
    selected = {**sweep[0], "epoch": 10 if pair == "cnn-probe" else 7,  # cnn-probe's best epoch is its last
                "val_map": VALIDATION[pair][2]}
    return {"probe": {"epochs": 10}, "sweep": sweep, "selected": selected}


def selection(pair: str, n_val: int) -> dict:
    """config.json summary.selection as train writes it (validation metrics the decision rule chooses on)."""
    f1, tail, val_map = VALIDATION[pair]
    return {"metric": "val_macro_f1_crossfit", "val_macro_f1_crossfit": f1, "val_tail_f1_crossfit": tail,
            "val_map": val_map, "n_val": n_val,
            "how": "validation macro-F1, thresholds cross-fitted over 2 folds, single-valued fields by arg-max"}


def write_eval(run: Path, ds, probs: np.ndarray, runtime: str = "torch", precision: str = "fp32") -> None:
    """eval/<name>/ as evaluate.score writes it (same provenance, scoring, bootstrap and files)."""
    from bakeoff.common.io import read_json, write_json
    from bakeoff.engines.runners import Runner
    from bakeoff.evaluate.score import (
        METRICS,
        PER_TAG,
        PREDICTIONS,
        eval_name,
        provenance,
        read_decision,
        score_predictions,
        test_split,
        write_per_tag,
        write_predictions,
    )

    class Fake(Runner):
        name, device = runtime, CPU

    runner = Fake()
    runner.precision = precision
    config = read_json(run / "config.json")
    name = eval_name(runtime, precision)
    out = run / "eval" / name
    rows, y_true, test_hash = test_split(ds)
    metrics = provenance(run, config, ds, runner, name) | {"test": {"split": "test", "n_images": len(rows),
                                                                     "ids_sha256": test_hash}}
    if not np.isfinite(probs).all():
        write_json(out / METRICS, metrics | {"status": "failed", "reason": "NaN logits", "n_nan": 1, "n_inf": 0})
        return
    decision = read_decision(run, ds.taxonomy)  # thresholds.json's rule (groups, where it has them)
    scores, per_tag = score_predictions(probs, y_true, decision, ds.stats(), ds.taxonomy, ds.fields)
    write_predictions(out / PREDICTIONS, probs)
    write_per_tag(out / PER_TAG, per_tag)
    write_json(out / METRICS, metrics | scores)


def write_latency(run: Path, runtime: str, precision: str, device: str, ms: float, estimate: bool = False) -> None:
    """latency/<runtime>.json as engines.bench writes it, timed on a fake clock (every tenth call twice as slow);
    on a GPU the fake times each call as CUDA events would (all of it GPU compute)."""
    from bakeoff.common.io import write_json
    from bakeoff.engines.bench import bench_runner, contention, is_t4, latency_path
    from bakeoff.engines.projection import project
    from bakeoff.engines.runners import Runner

    clock = SimpleNamespace(t=0.0)
    slow = itertools.cycle([1.0] * 9 + [2.0])

    class Fake(Runner):
        name = runtime

        def predict(self, batch):
            took = ms / 1e3 * next(slow) * (1 + 0.25 * (len(batch) - 1))
            clock.t += took
            if is_t4(device):
                self.last_timing = {"enqueue_ms": 0.01, "h2d_ms": 0.0, "gpu_compute_ms": took * 1e3, "d2h_ms": 0.0}
            return np.zeros((len(batch), 2), np.float32)

    runner = Fake()
    runner.device, runner.precision, runner.config = device, precision, {"preprocess": {"img_size": 2}}
    result = bench_runner(runner, [1, 8], warmup_s=0.0, duration_s=0.0, min_iters=20, clock=lambda: clock.t)
    cost = {"params": 1000, "flops_per_image": 4e9, "weight_bytes": 4e7, "activation_bytes_per_image": 3e7}
    other_s = 0.8 * 10.0 if (run.name, runtime) == CONTENDED else 0.0
    result |= {"pair": run.name, "is_t4": is_t4(device),
               "cpu_contention": contention((0.0, 15.0 + other_s), (0.0, 15.0), wall_s=10.0, cpus=2),
               "versions": {"python": "3.11", runtime: "9.9"},
               "estimate": project(cost, [1, 8]) if estimate else None}
    write_json(latency_path(run, runtime, precision), result)


def write_parity(run: Path, probs: np.ndarray, noise: dict[str, float]) -> None:
    """export/parity.json as export.parity writes it, each graph's logits off by Gaussian ``noise[precision]``."""
    from bakeoff.common.io import write_json
    from bakeoff.export.parity import parity_report

    logits = np.log(probs / (1 - probs)).astype(np.float64)
    rng = np.random.default_rng(5)
    report = parity_report(logits, {f"onnx_{precision}": {"precision": precision,
                                                          "logits": logits + rng.normal(scale=scale, size=logits.shape)}
                                    for precision, scale in noise.items()},
                           np.full(logits.shape[1], 0.5), pair=run.name)
    write_json(run / "export" / "parity.json", report)
    for name in ("model.onnx", "model.fp16.onnx"):
        (run / "export" / name).write_bytes(b"0" * 2_000_000)


def fabricate(root: Path) -> tuple[Path, Path]:
    from bakeoff.train.data.dataset import load_dataset

    data, runs = fabricate_dataset(root / "data"), root / "runs"
    ds = load_dataset(data)
    y = ds.labels()[ds.split_indices("test")]
    probs = pair_probabilities(y)
    for pair, p in probs.items():
        run = write_run(runs, ds, pair, random_init=pair == "cnn-probe")
        write_eval(run, ds, p)
        for runtime, precision, device, ms in LATENCIES.get(pair, []):
            write_latency(run, runtime, precision, device, ms, estimate=pair == "dinov2-probe")
    for pair, runtime, precision, noise in (("clip-ft", "onnxruntime", "fp32", 1e-4),
                                            ("dinov2-ft", "onnxruntime", "fp32", 1e-4),
                                            ("clip-probe", "tensorrt", "fp16", 1e-4),
                                            ("dinov2-probe", "tensorrt", "fp16", 1e-4),
                                            ("clip-ft", "onnxruntime", "fp16", 0.05)):  # outside the tolerance
        noisy = np.clip(probs[pair] + np.random.default_rng(1).normal(scale=noise, size=y.shape), 1e-6, 1 - 1e-6)
        write_eval(runs / pair, ds, noisy.astype(np.float32), runtime, precision)
    for pair in ("cnn-probe", "cnn-ft"):
        write_eval(runs / pair, ds, np.full(y.shape, np.nan, np.float32), "onnxruntime", "fp16")
    write_parity(runs / "clip-ft", probs["clip-ft"], {"fp32": 0.0, "fp16": 1e-3})
    write_parity(runs / "dinov2-ft", probs["dinov2-ft"], {"fp32": 3.0, "fp16": 1e-3})
    return runs, data


@pytest.fixture(scope="session")
def fake_runs(tmp_path_factory) -> tuple[Path, Path]:
    """(runs directory, dataset directory) of the fabricated scenario; treat as read-only."""
    return fabricate(tmp_path_factory.mktemp("reports"))
