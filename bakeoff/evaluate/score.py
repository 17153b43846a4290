"""Score complete runs on the held-out test split through any runtime; write ``RUNS/<pair>/eval/<name>/``.

``<name>`` is the runtime, plus ``-<precision>`` when that is not the runtime's default (``torch``,
``torch-bf16``, ``onnxruntime-fp16``). The directory holds:

- ``predictions.npy`` — float32 scores ``decision.scores(logits)`` of the run's rule (thresholds.json, a
  :class:`train.decision.Decision`): softmax within each group (the tags of a single-valued field), sigmoid
  elsewhere; a run without groups (every run from before groups existed) has plain sigmoid probabilities. N_test
  x T: rows in ``ds.split_indices("test")`` order (the sha256 of their ids is ``test.ids_sha256`` in
  metrics.json), columns in taxonomy order. Decisions are ``decision.apply(scores)``: arg-max within each group,
  ``score >= threshold`` elsewhere;
- ``per_tag.csv`` — one row per tag, columns :data:`evaluate.metrics.PER_TAG_COLUMNS` (a group tag has no
  threshold; its ``decided_by`` is ``argmax:<field>``);
- ``metrics.json`` — :func:`evaluate.metrics.score_run` (its per-tag rows go to per_tag.csv; ``decision``
  records the rule and the groups' fields), bootstrap CIs on the rule's decisions,
  deltas vs the fp32 evaluation of the same runtime when that already exists (score fp32 first), training
  and inference time, and provenance. Written last: once it exists the other two are whole. ``status`` is
  ``"scored"``, or ``"failed"`` with a ``reason`` when the outputs hold NaN/Inf (then nothing is scored and
  no other file is kept).

Every run is scored on the same bootstrap resamples (:data:`N_RESAMPLES` with :data:`BOOTSTRAP_SEED`), so
intervals and later comparisons are paired.
"""
from __future__ import annotations

import csv
import hashlib
import inspect
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from bakeoff.common.device import library_versions, pick_device
from bakeoff.common.distributed import world
from bakeoff.common.io import atomic_path, read_json, sha256_file, write_json
from bakeoff.common.timing import training_seconds
from bakeoff.engines.runners import RUNTIMES, Runner, open_runner
from bakeoff.evaluate.bootstrap import bca_interval, bootstrap_indices, bootstrap_macro_f1, jackknife_macro_f1
from bakeoff.evaluate.metrics import (
    BUCKETS,
    PER_TAG_COLUMNS,
    SCORE_RULE,
    NonFiniteScores,
    as_decision,
    binarize,
    bucket_masks,
    check_finite,
    macro_f1,
    score_run,
)
from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import Dataset, DatasetError, load_dataset
from bakeoff.train.decision import Decision
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.run import CONFIG, MODEL, THRESHOLDS, TIMING, RunError, is_complete
from bakeoff.train.weights import RANDOM_FLAG

EVAL, METRICS, PER_TAG, PREDICTIONS = "eval", "metrics.json", "per_tag.csv", "predictions.npy"
N_RESAMPLES, BOOTSTRAP_SEED, LEVEL = 1000, 0, 0.95


def fmt(x: float | None, digits: int = 4) -> str:
    """A metric for printing; ``n/a`` when undefined (None)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def default_precision(runtime: str) -> str | None:
    """The ``precision`` a runtime's factory uses when none is given (None if it takes no such argument)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; available here: {sorted(RUNTIMES)}")
    param = inspect.signature(RUNTIMES[runtime]).parameters.get("precision")
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def eval_name(runtime: str, precision: str | None = None) -> str:
    """``torch`` for the runtime's default precision, else ``torch-bf16`` style."""
    return runtime if precision is None or precision == default_precision(runtime) else f"{runtime}-{precision}"


def run_dirs(runs_dir: str | Path, pairs: Sequence[str] | None = None) -> list[Path]:
    """Run directories (those holding a config.json) under ``runs_dir``, sorted; only ``pairs`` when given."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RunError(f"{runs_dir}: not a runs directory")
    found = {d.name: d for d in sorted(runs_dir.iterdir())
             if d.is_dir() and not d.name.startswith(".") and (d / CONFIG).exists()}
    if pairs is None:
        return list(found.values())
    missing = [p for p in pairs if p not in found]
    if missing:
        raise RunError(f"{runs_dir}: no run named {', '.join(missing)} (runs here: {', '.join(found) or 'none'})")
    return [found[p] for p in pairs]


def ids_sha256(ids: Sequence[str]) -> str:
    """The hash metrics.json records for the test rows, in predictions.npy order."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def test_split(ds: Dataset) -> tuple[np.ndarray, np.ndarray, str]:
    """Test rows (manifest indices, predictions.npy order), their N x T labels, and the hash of their ids."""
    rows = ds.split_indices("test")
    if rows.size == 0:
        raise DatasetError(f"{ds.root}: the test split is empty")
    return rows, ds.labels()[rows], ids_sha256([ds.ids[i] for i in rows])


def check_run_matches(run_dir: Path, config: dict, ds: Dataset) -> None:
    """Refuse a run trained on another taxonomy or another version of the dataset (its test rows may differ)."""
    if config["taxonomy"] != ds.taxonomy:
        raise RunError(f"{run_dir / CONFIG}: the checkpoint's taxonomy ({len(config['taxonomy'])} tags) differs from "
                       f"dataset {ds.root} ({len(ds.taxonomy)} tags); it was trained on another dataset")
    if config["dataset"]["hash"] != ds.content_hash():
        raise RunError(f"{run_dir / CONFIG}: trained on dataset hash {config['dataset']['hash'][:12]}, but {ds.root} "
                       f"hashes to {ds.content_hash()[:12]} (manifest or splits changed); its test split is not held out")


def predict_logits(runner: Runner, images: np.ndarray, rows: np.ndarray, preprocess: Preprocess,
                   batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Logits (float32, len(rows) x T) of cached images ``rows``, preprocessed as the run was trained. Under
    torchrun each rank predicts its contiguous part of the rows and every rank gets all of them, in order."""
    w = world()
    lo, hi = w.part(len(rows))
    starts = range(lo, hi, batch_size)
    out = [runner.predict(preprocess(images[rows[s:min(hi, s + batch_size)]])).astype(np.float32, copy=False)
           for s in tqdm(starts, desc=f"{runner.name} {runner.precision}", disable=not progress or not w.main)]
    return w.gather(np.concatenate(out) if out else np.zeros((0, 0), np.float32))


def bootstrap_cis(y_true: np.ndarray, y_pred: np.ndarray, masks: dict[str, np.ndarray]) -> dict:
    """BCa CIs of macro-F1 overall and per bucket over the shared seeded resamples ([None, None]: no tag)."""
    idx = bootstrap_indices(y_true.shape[0], N_RESAMPLES, BOOTSTRAP_SEED)

    def ci(mask: np.ndarray | None) -> list[float | None]:
        lo, hi = bca_interval(bootstrap_macro_f1(y_true, y_pred, idx, mask), macro_f1(y_true, y_pred, mask)[0],
                              jackknife_macro_f1(y_true, y_pred, mask), LEVEL)
        return [None, None] if np.isnan(lo) else [lo, hi]

    return {"level": LEVEL, "n_resamples": N_RESAMPLES, "seed": BOOTSTRAP_SEED, "method": "BCa", "macro_f1": ci(None),
            **{f"{b}_macro_f1": ci(masks[b]) for b in BUCKETS}}


def score_predictions(probs: np.ndarray, y_true: np.ndarray, decision: Decision | np.ndarray, stats: dict,
                      taxonomy: Sequence[str], fields: dict[str, str] | None = None) -> tuple[dict, list[dict]]:
    """(metrics without provenance, per-tag rows) from test scores (predictions.npy) and the run's rule
    (plain thresholds: a rule without groups); buckets from the dataset's stats, group names from ``fields``
    (tag -> field, the dataset's) or the tag names."""
    decision = as_decision(decision, len(taxonomy))
    train_counts = np.asarray([stats["tags"][t]["train"] for t in taxonomy])
    tail, head = stats.get("long_tail_threshold", 50), stats.get("head_threshold", 500)
    metrics = score_run(y_true, probs, decision, train_counts, tail, head, tag_names=list(taxonomy), fields=fields)
    per_tag = metrics.pop("per_tag")
    metrics["ci"] = bootstrap_cis(y_true, binarize(probs, decision), bucket_masks(train_counts, tail, head))
    return metrics, per_tag


def prediction_deltas(ref: dict, ref_probs: np.ndarray, other: dict, probs: np.ndarray,
                      decision: Decision | np.ndarray) -> dict:
    """How ``other`` (metrics, scores) differs from the reference evaluation of the same run and rows; decisions
    flip by the run's rule (an arg-max that moves within a group flips the two tags it moves between)."""
    if ref["test"]["ids_sha256"] != other["test"]["ids_sha256"] or ref_probs.shape != probs.shape:
        raise RunError(f"{ref['eval']} and {other['eval']} of {other['pair']}: predictions are for different test "
                       "rows; re-evaluate both")

    def diff(key: Callable[[dict], float | None]) -> float | None:
        a, b = key(ref), key(other)
        return None if a is None or b is None else b - a

    decision = as_decision(decision, probs.shape[1])
    delta = np.abs(probs.astype(np.float64) - ref_probs)
    return {"reference": ref["eval"],
            "macro_f1": diff(lambda m: m["macro_f1"]),
            "tail_macro_f1": diff(lambda m: m["buckets"]["tail"]["macro_f1"]),
            "max_abs_prob": float(delta.max()), "mean_abs_prob": float(delta.mean()),
            "decisions_flipped": float(np.mean(binarize(probs, decision) != binarize(ref_probs, decision)))}


def read_eval(run_dir: str | Path, name: str, predictions: bool = True) -> tuple[dict, np.ndarray | None] | None:
    """(metrics, predictions or None) of ``run_dir/eval/name``; None when it was never evaluated."""
    path = Path(run_dir) / EVAL / name
    if not (path / METRICS).exists():
        return None
    metrics = read_json(path / METRICS)
    if not predictions or metrics["status"] != "scored":
        return metrics, None
    probs = np.load(path / PREDICTIONS)
    expected = (metrics["test"]["n_images"], metrics["n_tags"])
    if probs.shape != expected:
        raise RunError(f"{path / PREDICTIONS}: shape {probs.shape}, but {path / METRICS} describes {expected}; "
                       "re-evaluate the run")
    return metrics, probs


def read_decision(run_dir: Path, taxonomy: Sequence[str]) -> Decision:
    """The run's rule from thresholds.json: per-tag thresholds and the softmax groups (none in files written
    before groups existed: then it is exactly per-tag sigmoid thresholds)."""
    path = Path(run_dir) / THRESHOLDS
    doc = read_json(path)
    if doc.get("tags", list(taxonomy)) != list(taxonomy):
        raise RunError(f"{path}: tags differ from the run's taxonomy; retrain the run")
    try:
        decision = Decision.from_json(doc, taxonomy)
    except KeyError as e:
        raise RunError(f"{path}: group tag {e} is not in the run's taxonomy; retrain the run") from None
    except ValueError as e:
        raise RunError(f"{path}: {e}") from None
    if decision.n_tags != len(taxonomy):
        raise RunError(f"{path}: {decision.n_tags} thresholds for {len(taxonomy)} tags; retrain the run")
    return decision


read_thresholds = read_decision  # the name from before groups: it returns the whole rule now


def score_kind(metrics: dict) -> str:
    """How an evaluation's predictions.npy was computed from logits (``decision.score`` in metrics.json); one
    written before groups existed recorded nothing and holds sigmoid probabilities."""
    return (metrics.get("decision") or {}).get("score", SCORE_RULE[False])


def scores_match(metrics: dict, decision: Decision) -> bool:
    """Whether an evaluation's saved scores are of the kind ``decision`` makes (sigmoid probabilities of an old
    evaluation are right only for a rule without groups)."""
    return score_kind(metrics) == SCORE_RULE[bool(decision.groups)]


def provenance(run_dir: Path, config: dict, ds: Dataset, runner: Runner, name: str) -> dict:
    """What a later reader needs to trust (or refuse) an evaluation: run, weights, data, runner, versions."""
    weights = config["weights"]
    timing = read_json(run_dir / TIMING) if (run_dir / TIMING).exists() else {}
    return {
        "status": "scored", "pair": run_dir.name, "eval": name, "runtime": runner.name, "precision": runner.precision,
        "device": runner.device, "runner": runner.describe(),
        "weights": weights, "random_init": weights["kind"] == "random",
        "warning": RANDOM_FLAG if weights["kind"] == "random" else None,
        "run": {"dir": str(run_dir.resolve()), "config_sha256": sha256_file(run_dir / CONFIG),
                "model_sha256": sha256_file(run_dir / MODEL), "thresholds_sha256": sha256_file(run_dir / THRESHOLDS),
                "model": config["backbone"]["name"], "img_size": config["preprocess"]["img_size"]},
        "dataset": {"path": str(ds.root.resolve()), "hash": ds.content_hash()},
        "training": {"seconds": training_seconds(timing), "device": timing.get("device")},
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_predictions(path: Path, probs: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, probs.astype(np.float32, copy=False))


def write_per_tag(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=PER_TAG_COLUMNS)
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


def run_fingerprint(run_dir: Path, ds: Dataset) -> dict[str, str]:
    """What an evaluation of ``run_dir`` must match to be current: its config, checkpoint, thresholds, test rows,
    and the kind of scores its rule makes (see :func:`scores_match`). The config counts as the report does
    (``reports.artifacts``): a retrain that reproduces the same checkpoint still rewrites config.json."""
    grouped = bool(read_json(run_dir / THRESHOLDS).get("groups"))
    return {"config_sha256": sha256_file(run_dir / CONFIG), "model_sha256": sha256_file(run_dir / MODEL),
            "thresholds_sha256": sha256_file(run_dir / THRESHOLDS),
            "ids_sha256": test_split(ds)[2], "score": SCORE_RULE[grouped]}


def current_eval(run_dir: Path, name: str, ds: Dataset, fingerprint: dict[str, str] | None = None) -> dict | None:
    """metrics.json of ``run_dir/eval/name`` when it still describes this checkpoint, thresholds and test split,
    a scored one with scores of the kind the run's rule makes (``fingerprint``: the run's
    :func:`run_fingerprint`, when the caller checks several evaluations)."""
    path = run_dir / EVAL / name / METRICS
    if not path.exists():
        return None
    m = read_json(path)
    fp = fingerprint or run_fingerprint(run_dir, ds)
    run = m.get("run", {})
    current = (run.get("config_sha256") == fp["config_sha256"] and run.get("model_sha256") == fp["model_sha256"]
               and run.get("thresholds_sha256") == fp["thresholds_sha256"]
               and m.get("test", {}).get("ids_sha256") == fp["ids_sha256"]
               and (m.get("status") != "scored" or score_kind(m) == fp["score"]))
    return m if current else None


def evaluate_run(run_dir: str | Path, ds: Dataset | str | Path, runtime: str = "torch", *, batch_size: int = 128,
                 progress: bool = False, **runner_kw) -> dict:
    """Score one complete run on the test split through ``runtime``; write its eval directory; return metrics.json.

    ``runner_kw`` go to the runtime (``device``, ``precision``). Raises :class:`RunError` for an incomplete run
    or one trained on another taxonomy / dataset version; NaN/Inf outputs give ``status == "failed"``.
    """
    run_dir = Path(run_dir)
    ds = ds if isinstance(ds, Dataset) else load_dataset(ds)
    if not is_complete(run_dir):
        raise RunError(f"{run_dir}: not a complete run (no {CONFIG} with status 'complete'); train it first")
    config = read_json(run_dir / CONFIG)
    check_run_matches(run_dir, config, ds)
    decision = read_decision(run_dir, config["taxonomy"])
    rows, y_true, test_hash = test_split(ds)
    images = load_cache(ds, config["preprocess"]["cache_size"])
    preprocess = Preprocess.from_config(config["preprocess"], pick_device(runner_kw.get("device", "auto")))

    t = time.perf_counter()
    runner = open_runner(run_dir, runtime, **runner_kw)
    load_seconds = time.perf_counter() - t
    name = eval_name(runtime, runner.precision)
    out = run_dir / EVAL / name
    metrics = provenance(run_dir, config, ds, runner, name) | {
        "test": {"split": "test", "n_images": int(len(rows)), "ids_sha256": test_hash,
                 "order": "ds.split_indices('test') (manifest order)"}}
    w = world()
    if w.main:
        (out / METRICS).unlink(missing_ok=True)  # from here on, an old metrics.json would describe new files
    w.barrier()

    t = time.perf_counter()
    try:
        logits = predict_logits(runner, images, rows, preprocess, batch_size, progress)
    finally:
        runner.close()
    seconds = time.perf_counter() - t
    if not w.main:  # under torchrun the ranks shared the prediction; rank 0 scores and writes
        return {}
    metrics["inference"] = {"seconds": round(seconds, 3), "images_per_s": round(len(rows) / seconds, 1),
                            "batch_size": batch_size, "runner_load_seconds": round(load_seconds, 3),
                            "includes": "cache read + preprocessing + runner.predict, first batch included"}
    if logits.shape != y_true.shape:
        raise RunError(f"{run_dir}: {runtime} runner returned logits of shape {logits.shape}, expected {y_true.shape}")
    try:
        check_finite(logits, f"{out / PREDICTIONS} ({runtime} {runner.precision} logits)")
    except NonFiniteScores as e:
        for stale in (PREDICTIONS, PER_TAG):
            (out / stale).unlink(missing_ok=True)
        write_json(out / METRICS, {**metrics, "status": "failed", "reason": str(e), "n_nan": e.n_nan, "n_inf": e.n_inf})
        return read_json(out / METRICS)

    with np.errstate(over="ignore"):  # exp of a huge logit: the sigmoid saturates, as it should
        probs = decision.scores(logits)
    scores, per_tag = score_predictions(probs, y_true, decision, ds.stats(), ds.taxonomy, ds.fields)
    metrics |= scores
    fp32 = eval_name(runtime, "fp32")
    if runner.precision != "fp32" and fp32 != name and (ref := read_eval(run_dir, fp32)) and ref[1] is not None:
        same = all(ref[0][k].get(f) == metrics[k][f] for k, f in (
            ("run", "model_sha256"), ("run", "thresholds_sha256"), ("test", "ids_sha256")))
        if same and scores_match(ref[0], decision):
            metrics["vs_fp32"] = prediction_deltas(ref[0], ref[1], metrics, probs, decision)
    write_predictions(out / PREDICTIONS, probs)
    write_per_tag(out / PER_TAG, per_tag)
    write_json(out / METRICS, metrics)
    return read_json(out / METRICS)


def evaluate_all(runs_dir: str | Path, data: str | Path | Dataset, runtime: str = "torch", *,
                 pairs: Sequence[str] | None = None, batch_size: int = 128, progress: bool = False,
                 log: Callable[[str], None] = print, force: bool = False, **runner_kw) -> dict[str, dict]:
    """Evaluate every complete run under ``runs_dir`` (or ``pairs``); pair -> metrics.

    Incomplete runs come back as ``{"status": "skipped", "reason": ...}`` and refused ones (mismatched
    dataset, missing cache or export) as ``{"status": "refused", ...}``; each gets one ``log`` line. An
    evaluation that is current (same checkpoint, thresholds and test rows) is kept unless ``force``.
    """
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    w = world()
    log = log if w.main else (lambda line: None)
    results: dict[str, dict] = {}
    name = eval_name(runtime, runner_kw.get("precision") or default_precision(runtime))
    for run_dir in run_dirs(runs_dir, pairs):
        pair = run_dir.name
        if not is_complete(run_dir):
            results[pair] = {"status": "skipped", "reason": f"{run_dir}: incomplete run (status is not 'complete')"}
            log(f"{pair}: skipped, the run is incomplete")
            continue
        if not force and (done := w.broadcast(current_eval(run_dir, name, ds) if w.main else None)) is not None:
            results[pair] = done
            log(f"{pair} ({name}): evaluation is current, kept (--force redoes it)")
            continue
        try:
            m = evaluate_run(run_dir, ds, runtime, batch_size=batch_size, progress=progress, **runner_kw)
        except (RunError, DatasetError, ValueError, OSError) as e:
            results[pair] = {"status": "refused", "reason": str(e)}
            log(f"{pair}: REFUSED: {e}")
            continue
        if not w.main:
            continue
        results[pair] = m
        if m["status"] == "failed":
            log(f"{pair}: FAILED ({m['eval']}): {m['reason']}")
        else:
            lo, hi = m["ci"]["macro_f1"]
            log(f"{pair} ({m['eval']}, {m['device']}): macro-F1 {fmt(m['macro_f1'])} [{fmt(lo)}, {fmt(hi)}], "
                f"tail-F1 {fmt(m['buckets']['tail']['macro_f1'])}, mAP {fmt(m['macro_ap'])}, "
                f"{m['inference']['images_per_s']:.0f} img/s" + (f"  ({m['warning']})" if m["warning"] else ""))
    return results


def rescore_run(run_dir: str | Path, ds: Dataset) -> dict[str, str]:
    """Recompute the scores (metrics, CIs, per-tag table) of every current evaluation of ``run_dir`` from its
    saved predictions, without running the model again (e.g. after a change to the metric code); eval name ->
    what happened. Stale or failed evaluations are left alone and said so; so are evaluations whose saved scores
    are sigmoid probabilities (written before groups existed) of a run whose rule has groups."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / CONFIG)
    decision = read_decision(run_dir, config["taxonomy"])
    _, y_true, _ = test_split(ds)
    fingerprint = run_fingerprint(run_dir, ds)  # once: the checkpoint can be hundreds of MB
    done = {}
    for out in sorted(p for p in (run_dir / EVAL).glob("*") if (p / METRICS).exists()):
        metrics = current_eval(run_dir, out.name, ds, fingerprint)
        if metrics is None or metrics["status"] != "scored" or not (out / PREDICTIONS).exists():
            done[out.name] = ("left alone: stale (checkpoint, thresholds or test rows changed, or its scores are not "
                              "the kind the run's rule makes) or not scored (re-evaluate it)")
            continue
        scores, per_tag = score_predictions(np.load(out / PREDICTIONS), y_true, decision, ds.stats(), ds.taxonomy,
                                            ds.fields)
        write_per_tag(out / PER_TAG, per_tag)
        write_json(out / METRICS, metrics | scores | {
            "rescored": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        done[out.name] = f"rescored: macro-F1 {fmt(scores['macro_f1'])} {scores['ci']['method']} CI " \
                         f"[{fmt(scores['ci']['macro_f1'][0])}, {fmt(scores['ci']['macro_f1'][1])}]"
    return done
