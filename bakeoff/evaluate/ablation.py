"""Long-tail ablation: each long-tail method of the toolkit against the plain baseline, per probe run.

    python -m evaluate.ablation --runs RUNS --data DATASET [--pairs cnn-probe,dinov2-probe] [--force]

For every complete linear-probe run (strategy ``probe``) it trains one linear head per *variant* on the very
features the run was trained on, with the run's own weight-decay grid, epochs and seed
(``config.json`` ``summary.probe``), fits each variant's decision rule on validation only
(:func:`train.selection.fit_decision`), applies it to the test split and scores test macro-F1 and long-tail
macro-F1. Each variant is compared with the baseline by a paired bootstrap over the test images (the toolkit's
seeded resamples, :data:`evaluate.score.N_RESAMPLES` / :data:`evaluate.score.BOOTSTRAP_SEED`, 95% BCa): a
method **helps** only when the CI of its difference lies above 0, **hurts** when it lies below 0, and otherwise
**does not help** (the data cannot tell it from the baseline).

Variants (:data:`VARIANTS`): ``baseline`` (sigmoid BCE head, per-tag thresholds fitted on validation, no
shrinkage), ``shrink`` (thresholds shrunk towards their bucket's pooled threshold, strength by cross-fitting),
``asl`` (asymmetric loss), ``balanced`` (class-balanced BCE), ``field`` (softmax per single-valued field,
arg-max), ``field+la`` (+ logit adjustment, tau selected on validation), ``field+la+shrink`` (the toolkit's
default), and cRT (:mod:`train.rebalance`: the head trained on a repeat-factor re-sample of the training
features, seeded as the run's probe does it): ``crt`` (the baseline's head and rule) and ``field+la+shrink+crt``
(the default with ``--rebalance crt``). Field variants need a single-valued field; without one they are skipped
and said so. Variants that share a head (same head kind, loss and re-sampling) share one trained head: they
differ only in the decision rule.

Each variant also records its validation scores (cross-fitted macro-F1 and long-tail macro-F1 with bootstrap
standard errors, as a run's ``summary.selection``), and ``rebalance_on_validation`` makes the re-sampling choice
from them, never from test: per cRT variant against the same variant without it, cRT is chosen only when its
validation long-tail F1 exceeds the other's by more than one standard error (else the plain training set).

Features:
- train + validation features for the heads' training and weight-decay selection: the run's own feature cache
  (``RUNS/.cache/features-<key>``: located by the key the run recorded (``summary.feature_cache``) when present,
  else by the key :func:`train.strategies.run_probe` derives from the config, else by searching the caches for
  one with the run's rows and backbone), re-extracted exactly as training did when it was deleted;
- validation + test features for the decision rules and the test scores: computed once per checkpoint with the
  run's backbone in fp32 (``RUNS/.cache/ablation-<key>``, keyed by the checkpoint's sha256 and the rows), as
  training computes the validation logits its rule is fitted on and as evaluation computes test logits.

The test split is used for scoring only: every selection (weight decay, tau, shrinkage, thresholds, re-sampling)
reads train and validation rows. A run trained with ``--aug-views`` is ablated on its un-augmented features, so
no variant reproduces it; a run whose head also sees colour histograms (``--colour``) is refused. Output:
``RUNS/<pair>/eval/ablation.json`` (atomic), kept while it describes the current checkpoint, dataset and test rows
(``--force`` redoes it).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bakeoff.common.device import library_versions, pick_device, setup_threads
from bakeoff.common.io import read_json, sha256_file, write_json
from bakeoff.common.log import add_verbosity_flags, setup_logging
from bakeoff.evaluate.bootstrap import (
    bca_interval,
    bootstrap_indices,
    bootstrap_macro_f1,
    jackknife_macro_f1,
    paired_bootstrap,
)
from bakeoff.evaluate.compare import render
from bakeoff.evaluate.metrics import bucket_masks, macro_f1
from bakeoff.evaluate.score import BOOTSTRAP_SEED, EVAL, LEVEL, N_RESAMPLES, check_run_matches, run_dirs, test_split
from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import Dataset, DatasetError, load_dataset
from bakeoff.train.decision import Decision, single_valued_groups
from bakeoff.train.features import FeatureStore, cache_key, extract
from bakeoff.train.heads import HeadLoss, adjusted, group_log_prior
from bakeoff.train.losses import class_balanced_pos_weight
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.probe import ProbeConfig, train_probe
from bakeoff.train.rebalance import rebalanced, repeat_threshold
from bakeoff.train.run import CONFIG, MODEL, RunError, cache_weights, is_complete, load_run, train_rows
from bakeoff.train.selection import Fitted, fit_decision
from bakeoff.train.weights import RANDOM_FLAG

ABLATION = "ablation.json"
VERSION = 2  # bump when the variants or the way they are scored change: older files are redone
BASELINE = "baseline"
HELPS, NO_HELP, HURTS, UNDEFINED = "helps", "does not help", "hurts", "n/a"
METRICS = ("macro_f1", "tail_f1")  # overall and long-tail macro-F1
REBALANCE_RULE = ("re-sampling (cRT) is chosen only when its cross-fitted validation long-tail macro-F1 exceeds the "
                  "same variant's without it by more than that one's bootstrap standard error; test is not read")
EVAL_FEATURES = "ablation"  # RUNS/.cache/ablation-<key>: fp32 validation + test features of one checkpoint


@dataclass(frozen=True)
class Variant:
    """One way to train and decide: head kind (``sigmoid`` per tag, or ``field``: softmax per single-valued
    field), per-tag loss, the decision's tau / shrinkage (a number: fixed; None: selected on validation), and the
    training set's re-sampling (:data:`train.rebalance.REBALANCE`)."""

    name: str
    head: str
    loss: str
    tau: float | None
    shrink: float | None
    what: str
    rebalance: str = "none"

    @property
    def needs_groups(self) -> bool:
        return self.head == "field"


VARIANTS = (
    Variant(BASELINE, "sigmoid", "bce", 0.0, 0.0, "sigmoid BCE head, per-tag thresholds fitted on validation"),
    Variant("shrink", "sigmoid", "bce", 0.0, None,
            "baseline head; thresholds shrunk towards their bucket's pooled threshold (strength by cross-fitting)"),
    Variant("asl", "sigmoid", "asl", 0.0, 0.0, "asymmetric loss (ASL) head, per-tag thresholds"),
    Variant("balanced", "sigmoid", "balanced", 0.0, 0.0, "class-balanced BCE head, per-tag thresholds"),
    Variant("field", "field", "bce", 0.0, 0.0, "softmax per single-valued field, arg-max; other tags as baseline"),
    Variant("field+la", "field", "bce", None, 0.0, "field + logit adjustment (tau selected on validation)"),
    Variant("field+la+shrink", "field", "bce", None, None,
            "field + logit adjustment + threshold shrinkage (the toolkit's default)"),
    Variant("crt", "sigmoid", "bce", 0.0, 0.0,
            "baseline head trained on a repeat-factor re-sample of the training features (cRT)", "crt"),
    Variant("field+la+shrink+crt", "field", "bce", None, None,
            "the toolkit's default with its head trained on the repeat-factor re-sample (--rebalance crt)", "crt"),
)


def verdict(ci: Sequence[float | None] | None) -> str:
    """``helps`` when the CI of (variant - baseline) lies above 0, ``hurts`` below 0, else ``does not help``."""
    if not ci or ci[0] is None or ci[1] is None or np.isnan(ci[0]) or np.isnan(ci[1]):
        return UNDEFINED
    return HELPS if ci[0] > 0 else HURTS if ci[1] < 0 else NO_HELP


def _num(x) -> float | None:
    """A JSON number: NaN (undefined) becomes None."""
    return None if x is None or np.isnan(x) else float(x)


def _json(obj):
    """``obj`` with every NaN float (an undefined score) as None and numpy scalars as Python numbers: strict JSON."""
    if isinstance(obj, dict):
        return {k: _json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------- features


def _expected_rows(config: dict, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) the run trained on, as train.run.train_pair chose them."""
    opts = config.get("options", {})
    rows_train = train_rows(ds, opts.get("max_train_images"), opts.get("seed", 0))
    if len(rows_train) != config["dataset"].get("n_train_used", len(rows_train)):
        raise RunError(f"{config['run_dir']}/{CONFIG}: trained on {config['dataset']['n_train_used']} train images, "
                       f"but its options select {len(rows_train)} of {ds.root}; retrain the run")
    return rows_train, ds.split_indices("val")


def _train_store_key(config: dict, rows: np.ndarray) -> str:
    """The key train.strategies.run_probe gives the run's feature cache (train.run.train_pair's key parts)."""
    parts = dict(model=config["backbone"], weights=cache_weights(config["weights"]), preprocess=config["preprocess"],
                 dataset=config["dataset"]["hash"], rows=cache_key(rows=rows.tolist()))
    return "features-" + cache_key(**parts, what="features")


def _holds(store: FeatureStore, rows: np.ndarray, model_name: str, keyed: bool = False) -> bool:
    """A complete feature cache of ``rows`` (same order) by the backbone ``model_name`` (``keyed``: found by a key
    that already encodes the backbone, so a cache that does not name its model is accepted too)."""
    if not (store.holds(("features",)) and (store.dir / "rows.npy").is_file()):
        return False
    named = read_json(store.dir / "meta.json").get("describe", {}).get("model")
    return (named == model_name or (keyed and named is None)) and np.array_equal(store.rows(), rows)


def find_train_store(cache_root: Path, config: dict, rows: np.ndarray) -> tuple[FeatureStore | None, str]:
    """The probe run's feature cache of ``rows`` (train then validation), and how it was found. In order: the
    key the run recorded (``summary.feature_cache``), the key run_probe derives, the only cache holding exactly
    these rows from this backbone. (None, why) when there is none; refuses an ambiguous search."""
    name = config["backbone"]["name"]
    recorded = config.get("summary", {}).get("feature_cache")
    if recorded:
        store = FeatureStore(cache_root, Path(recorded).name)
        if _holds(store, rows, name, keyed=True):
            return store, "recorded by the run (summary.feature_cache)"
    store = FeatureStore(cache_root, _train_store_key(config, rows))
    if _holds(store, rows, name, keyed=True):
        return store, "the key run_probe derives from the run's config"
    found = [FeatureStore(cache_root, d.name) for d in sorted(cache_root.glob("features-*")) if d.is_dir()]
    found = [s for s in found if _holds(s, rows, name)]
    if len(found) > 1:
        raise RunError(f"{cache_root}: {len(found)} feature caches hold the rows of {config['run_dir']} from {name} "
                       f"({', '.join(s.key for s in found)}), e.g. from other weights; delete the stale ones")
    if found:
        return found[0], "search: the only cache with the run's rows and backbone"
    return None, f"no feature cache of the run's rows from {name} under {cache_root}"


def train_features(cache_root: Path, config: dict, model, preprocess: Preprocess, images: np.ndarray,
                   rows: np.ndarray, batch_size: int, progress: bool) -> tuple[np.ndarray, dict]:
    """The features the run's heads trained on (float32 copy) and where they came from; re-extracted as
    run_probe extracts them (bf16 autocast, float16 cache, its key) when the cache is gone."""
    store, how = find_train_store(cache_root, config, rows)
    if store is None:
        store = FeatureStore(cache_root, _train_store_key(config, rows))
        how = f"re-extracted as run_probe does ({how})"
        extract(model.backbone, preprocess, images, rows, store, ("features",), batch_size=batch_size,
                progress=progress, describe={"model": config["backbone"]["name"], "rows": len(rows)})
    dtype = read_json(store.dir / "meta.json").get("dtype")
    return np.array(store.load("features"), dtype=np.float32), {"key": store.key, "found": how, "dtype": dtype}


def eval_features(cache_root: Path, config: dict, model_sha256: str, model, preprocess: Preprocess,
                  images: np.ndarray, rows: np.ndarray, batch_size: int, progress: bool) -> tuple[np.ndarray, dict]:
    """fp32 features of ``rows`` (validation then test) by the run's backbone, cached per checkpoint."""
    key = f"{EVAL_FEATURES}-" + cache_key(model_sha256=model_sha256, preprocess=config["preprocess"],
                                          dataset=config["dataset"]["hash"], rows=cache_key(rows=rows.tolist()),
                                          amp=False, dtype="float32", what="features")
    store = FeatureStore(cache_root, key)
    reused = store.complete
    feats = extract(model.backbone, preprocess, images, rows, store, ("features",), batch_size=batch_size,
                    dtype="float32", amp=False, progress=progress,
                    describe={"model": config["backbone"]["name"], "rows": len(rows), "what": "validation + test, fp32",
                              "run": config["pair"], "model_sha256": model_sha256})["features"]
    return np.array(feats, dtype=np.float32), {"key": key, "dtype": "float32", "amp": False, "reused": reused}


# ------------------------------------------------------------------------------------------ the variants


@dataclass
class Problem:
    """Everything a variant is trained, fitted and scored on. Selection reads train and validation only."""

    x_train: np.ndarray  # the run's cached features (what its probe trained on)
    y_train: np.ndarray
    x_val_cached: np.ndarray  # the same cache's validation rows: weight-decay selection, as the run selected
    x_val: np.ndarray  # fp32 validation features: the decision rules are fitted on these
    y_val: np.ndarray
    x_test: np.ndarray  # fp32 test features: scoring only
    y_test: np.ndarray
    groups: list[list[int]]
    train_counts: np.ndarray
    pos_weight: torch.Tensor
    tail: int
    head: int
    probe: ProbeConfig
    repeat_threshold: float  # cRT's t, as train.run derives it


def logits_of(head: torch.nn.Linear, x: np.ndarray) -> np.ndarray:
    """float32 logits of a head on raw features."""
    with torch.no_grad():
        return head(torch.from_numpy(np.array(x, dtype=np.float32))).numpy()


def head_loss(variant: Variant, p: Problem) -> HeadLoss:
    groups = p.groups if variant.needs_groups else []
    return HeadLoss(groups, variant.loss, p.pos_weight if variant.loss == "balanced" else None,
                    n_tags=p.y_train.shape[1])


def fit_variants(p: Problem, variants: Sequence[Variant], device: torch.device | str = "cpu",
                 log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Train each distinct head once and fit every variant's decision rule, from train and validation only.
    name -> {"variant", "head" (nn.Linear), "shared_with", "probe" (selection), "fitted" (train.selection.Fitted)}."""
    heads: dict[tuple[str, str, str], tuple[torch.nn.Linear, dict, str]] = {}
    out = {}
    for v in variants:
        key = (v.head, v.loss, v.rebalance)
        if key not in heads:
            t = time.perf_counter()
            x, y, resample = rebalanced(p.x_train, p.y_train, v.rebalance, p.repeat_threshold, p.probe.seed)
            res = train_probe(x, y, p.x_val_cached, p.y_val, p.probe, head_loss(v, p), device)
            heads[key] = (res.head, {"selected": res.best, "sweep": res.sweep, "resample": resample,
                                     "seconds": round(time.perf_counter() - t, 3)}, v.name)
            log(f"  {v.name}: head trained, weight decay {res.best['weight_decay']:g} "
                f"(validation mAP {res.best['val_map']:.4f})")
        head, probe, first = heads[key]
        groups = p.groups if v.needs_groups else []
        fitted = fit_decision_for(v, p, head, groups)
        out[v.name] = {"variant": v, "head": head, "probe": probe, "shared_with": None if first == v.name else first,
                       "groups": groups, "fitted": fitted}
    return out


def fit_decision_for(v: Variant, p: Problem, head: torch.nn.Linear, groups: list[list[int]]) -> Fitted:
    """The variant's rule fitted on validation logits (tau and shrinkage fixed or selected, as it says)."""
    return fit_decision(p.y_val, logits_of(head, p.x_val), groups, p.train_counts, p.tail, p.head,
                        logit_adjust=v.tau, shrink=v.shrink, seed=p.probe.seed)


def decisions_on_test(fit: dict, p: Problem) -> np.ndarray:
    """Bool N_test x T decisions of a fitted variant: its rule on its adjusted test logits."""
    fitted = fit["fitted"]
    prior = group_log_prior(p.train_counts, fit["groups"], p.y_test.shape[1])
    z = adjusted(logits_of(fit["head"], p.x_test), prior, fitted.tau)
    with np.errstate(over="ignore"):
        return fitted.decision.apply(fitted.decision.scores(z))


def _ci(y: np.ndarray, pred: np.ndarray, idx: np.ndarray, mask: np.ndarray | None) -> list[float | None]:
    lo, hi = bca_interval(bootstrap_macro_f1(y, pred, idx, mask), macro_f1(y, pred, mask)[0],
                          jackknife_macro_f1(y, pred, mask), LEVEL)
    return [None, None] if np.isnan(lo) else [float(lo), float(hi)]


def _paired(y: np.ndarray, pred: np.ndarray, base: np.ndarray, idx: np.ndarray, mask: np.ndarray | None) -> dict:
    res = paired_bootstrap(y, pred, base, idx, mask, LEVEL)
    ci = [_num(c) for c in res["ci"]]
    return {"delta": _num(res["observed_diff"]), "ci": ci, "mean_diff": _num(res["mean_diff"]),
            "p_better": _num(res["p_a_better"]), "n_resamples": res["n_resamples"], "verdict": verdict(ci)}


def score_variants(fits: dict[str, dict], p: Problem) -> dict[str, dict]:
    """Test macro-F1 and long-tail macro-F1 of each variant with BCa CIs, and paired bootstraps against the
    baseline on the shared seeded resamples."""
    idx = bootstrap_indices(len(p.y_test), N_RESAMPLES, BOOTSTRAP_SEED)
    tail = bucket_masks(p.train_counts, p.tail, p.head)["tail"]
    y = p.y_test.astype(bool)
    preds = {name: decisions_on_test(fit, p) for name, fit in fits.items()}
    base = preds[BASELINE]
    out = {}
    for name, pred in preds.items():
        scores = {}
        for metric, mask in zip(METRICS, (None, tail)):
            value, n = macro_f1(y, pred, mask)
            scores[metric] = {"value": _num(value), "n_tags_scored": int(n), "ci": _ci(y, pred, idx, mask),
                              "vs_baseline": _paired(y, pred, base, idx, mask)}
        out[name] = scores
    return out


def describe_fit(fit: dict) -> dict:
    """What a variant selected, and on what (validation only)."""
    v, rep = fit["variant"], fit["fitted"].report
    best = fit["probe"]["selected"]
    sel = rep["selection"]
    return {"what": v.what, "head": {"kind": v.head, "loss": v.loss, "groups": len(fit["groups"]),
                                     "rebalance": v.rebalance, "resample": fit["probe"]["resample"],
                                     "shared_with": fit["shared_with"]},
            "selected": {"weight_decay": best["weight_decay"], "epoch": best["epoch"], "val_map": best["val_map"],
                         "on_grid_edge": best["on_grid_edge"], "tau": rep["logit_adjust_tau"],
                         "shrink": rep["threshold_shrink"]},
            "fixed": {"tau": v.tau, "shrink": v.shrink},  # None: selected on validation
            "validation": {"macro_f1_crossfit": sel["val_macro_f1_crossfit"],
                           "macro_f1_crossfit_se": sel["val_macro_f1_crossfit_se"],
                           "tail_f1_crossfit": sel["val_tail_f1_crossfit"],
                           "tail_f1_crossfit_se": sel["val_tail_f1_crossfit_se"],
                           "tau_macro_f1": rep["tau_val_macro_f1"],
                           "shrink_crossfit_macro_f1": rep["shrink_crossfit_macro_f1"]},
            "sweep": fit["probe"]["sweep"], "head_seconds": fit["probe"]["seconds"]}


def rebalance_on_validation(described: dict[str, dict]) -> dict:
    """The re-sampling choice, made on validation: per cRT variant, against the variant that differs only in not
    re-sampling, their cross-fitted validation scores and the choice (:data:`REBALANCE_RULE`)."""
    choices = []
    for v in VARIANTS:
        if v.rebalance == "none" or v.name not in described:
            continue
        plain = next(w.name for w in VARIANTS if w.rebalance == "none" and
                     (w.head, w.loss, w.tau, w.shrink) == (v.head, v.loss, v.tau, v.shrink))
        a, b = described[v.name]["validation"], described[plain]["validation"]
        gain = None if a["tail_f1_crossfit"] is None or b["tail_f1_crossfit"] is None else \
            a["tail_f1_crossfit"] - b["tail_f1_crossfit"]
        se = b["tail_f1_crossfit_se"]
        choices.append({"with": v.name, "without": plain,
                        "val_tail_f1": {v.name: a["tail_f1_crossfit"], plain: b["tail_f1_crossfit"]},
                        "val_macro_f1": {v.name: a["macro_f1_crossfit"], plain: b["macro_f1_crossfit"]},
                        "tail_gain": gain, "tail_se": se,
                        "choice": v.rebalance if gain is not None and gain > (se or 0.0) else "none"})
    return {"rule": REBALANCE_RULE, "choices": choices}


def run_variant(config: dict, has_groups: bool) -> str | None:
    """The variant that is the run's own configuration (head kind, loss, re-sampling, tau and shrinkage options), if
    any (none for a run whose head also trained on augmented views: the ablation trains on the originals only)."""
    opts = config.get("options", {})
    if opts.get("aug_views", 0):
        return None
    head = "field" if opts.get("head", "field") == "field" and has_groups else "sigmoid"
    for v in VARIANTS:
        if (v.head, v.loss, v.rebalance) == (head, opts.get("loss", "bce"), opts.get("rebalance", "none")) and \
                v.shrink == opts.get("threshold_shrink") and (head == "sigmoid" or v.tau == opts.get("logit_adjust")):
            return v.name
    return None


def reproduction(config: dict, model, run_decision: Decision, fits: dict[str, dict], scores: dict[str, dict],
                 has_groups: bool, reference: dict | None) -> dict | None:
    """How closely the variant with the run's own configuration reproduces the run: its head against the
    checkpoint's (logit adjustment taken back out), its tau, shrinkage and free-tag thresholds against the run's,
    and its test macro-F1 against the run's PyTorch evaluation (``reference``: a current eval/torch/metrics.json)."""
    name = run_variant(config, has_groups)
    if name is None or name not in fits:
        return None
    fit, dec = fits[name], config.get("decision", {})
    shift = torch.as_tensor(dec.get("bias_shift", np.zeros(model.head.out_features)), dtype=torch.float32)
    with torch.no_grad():
        diff = max(float((fit["head"].weight - model.head.weight.cpu()).abs().max()),
                   float((fit["head"].bias - (model.head.bias.cpu() - shift)).abs().max()))
    rep, ours = fit["fitted"].report, fit["fitted"].decision
    same_groups = ours.groups == run_decision.groups
    free = ours.free_mask()
    out = {"variant": name, "max_abs_head_diff": diff,
           "tau": {"ablation": rep["logit_adjust_tau"], "run": dec.get("logit_adjust_tau")},
           "shrink": {"ablation": rep["threshold_shrink"], "run": dec.get("threshold_shrink")},
           "same_groups": same_groups,
           "max_abs_threshold_diff": float(np.abs(ours.thresholds - run_decision.thresholds)[free].max(initial=0.0))
           if same_groups else None}
    if reference is not None:
        out["test_macro_f1"] = {"ablation": scores[name]["macro_f1"]["value"], "eval/torch": reference.get("macro_f1"),
                                "tail_ablation": scores[name]["tail_f1"]["value"],
                                "tail_eval/torch": (reference.get("buckets") or {}).get("tail", {}).get("macro_f1")}
    return out


def _reference_eval(run_dir: Path, model_sha256: str, test_hash: str) -> dict | None:
    """The run's PyTorch fp32 evaluation when it scored this checkpoint on these test rows."""
    path = run_dir / EVAL / "torch" / "metrics.json"
    if not path.is_file():
        return None
    m = read_json(path)
    ok = (m.get("status") == "scored" and (m.get("run") or {}).get("model_sha256") == model_sha256
          and (m.get("test") or {}).get("ids_sha256") == test_hash)
    return m if ok else None


# ---------------------------------------------------------------------------------------------- one run


def _fingerprint(run_dir: Path, ds: Dataset) -> dict:
    return {"model_sha256": sha256_file(run_dir / MODEL), "dataset_hash": ds.content_hash(),
            "test_ids_sha256": test_split(ds)[2]}


def current_ablation(run_dir: Path, ds: Dataset, fingerprint: dict | None = None) -> dict | None:
    """ablation.json of ``run_dir`` when it describes the current checkpoint, dataset and test rows (and this
    version of the ablation); else None."""
    path = Path(run_dir) / EVAL / ABLATION
    if not path.is_file():
        return None
    doc = read_json(path)
    fp = fingerprint or _fingerprint(Path(run_dir), ds)
    ok = (doc.get("version") == VERSION and doc.get("run", {}).get("model_sha256") == fp["model_sha256"]
          and doc.get("dataset", {}).get("hash") == fp["dataset_hash"]
          and doc.get("test", {}).get("ids_sha256") == fp["test_ids_sha256"])
    return doc if ok else None


def probe_config(config: dict) -> ProbeConfig:
    """The run's probe settings (grid, epochs, lr, batch, seed) from config.json ``summary.probe``."""
    rec = config.get("summary", {}).get("probe")
    if not rec:
        raise RunError(f"{config['run_dir']}/{CONFIG}: no summary.probe (not a probe run, or written before the "
                       "probe recorded its settings); retrain it")
    known = {f.name for f in fields(ProbeConfig)}
    kw = {k: v for k, v in rec.items() if k in known}
    return ProbeConfig(**{**kw, "weight_decays": tuple(kw.get("weight_decays", ProbeConfig.weight_decays))})


def ablate_run(run_dir: str | Path, ds: Dataset | str | Path, *, device: str = "auto", batch_size: int = 128,
               progress: bool = False, write: bool = True, log: Callable[[str], None] = lambda s: None) -> dict:
    """Ablate one complete probe run; return ablation.json's content (written atomically when ``write``)."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    ds = ds if isinstance(ds, Dataset) else load_dataset(ds)
    if not is_complete(run_dir):
        raise RunError(f"{run_dir}: not a complete run (no {CONFIG} with status 'complete'); train it first")
    config = read_json(run_dir / CONFIG) | {"run_dir": str(run_dir)}
    if config.get("strategy") != "probe":
        raise RunError(f"{run_dir}: strategy {config.get('strategy')!r}; the ablation retrains linear heads on a "
                       "probe run's frozen features")
    if config.get("colour"):
        raise RunError(f"{run_dir}: its head also sees colour histograms (--colour); the ablation retrains heads on "
                       "the pooled features alone, so it would not describe this run")
    check_run_matches(run_dir, config, ds)
    cfg = probe_config(config)
    dev = pick_device(device)
    model_sha = sha256_file(run_dir / MODEL)
    model, config, run_decision = load_run(run_dir, ds, "cpu")
    config = config | {"run_dir": str(run_dir)}
    model.to(dev)
    preprocess = Preprocess.from_config(config["preprocess"], dev)
    images = load_cache(ds, config["preprocess"]["cache_size"])
    cache_root = run_dir.parent / ".cache"
    seconds = {}

    t = time.perf_counter()
    rows_train, rows_val = _expected_rows(config, ds)
    x_tv, train_src = train_features(cache_root, config, model, preprocess, images,
                                     np.concatenate([rows_train, rows_val]), batch_size, progress)
    rows_test, y_test, test_hash = test_split(ds)
    x_vt, eval_src = eval_features(cache_root, config, model_sha, model, preprocess, images,
                                   np.concatenate([rows_val, rows_test]), batch_size, progress)
    seconds["features"] = time.perf_counter() - t
    model.cpu()

    stats = ds.stats()
    y = ds.labels()
    train_counts = np.asarray([stats["tags"][tg]["train"] for tg in ds.taxonomy])
    groups = single_valued_groups(y[ds.split_indices("train")], [ds.fields.get(tg, "") for tg in ds.taxonomy])
    n_tr, n_val = len(rows_train), len(rows_val)
    p = Problem(x_train=x_tv[:n_tr], y_train=y[rows_train], x_val_cached=x_tv[n_tr:], x_val=x_vt[:n_val],
                y_val=y[rows_val], x_test=x_vt[n_val:], y_test=y_test, groups=groups, train_counts=train_counts,
                pos_weight=class_balanced_pos_weight(train_counts, len(ds.split_indices("train"))),
                tail=stats.get("long_tail_threshold", 50), head=stats.get("head_threshold", 500), probe=cfg,
                repeat_threshold=repeat_threshold(stats.get("long_tail_threshold", 50), len(ds.split_indices("train"))))
    variants = [v for v in VARIANTS if groups or not v.needs_groups]
    skipped = {v.name: "the dataset has no single-valued field (no softmax group to build)"
               for v in VARIANTS if v not in variants}

    t = time.perf_counter()
    fits = fit_variants(p, variants, dev, log)
    seconds["heads_and_decisions"] = time.perf_counter() - t
    t = time.perf_counter()
    scores = score_variants(fits, p)
    seconds["scoring"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start

    random_init = config["weights"].get("kind") == "random"
    described = {name: {**describe_fit(fits[name]), "test": scores[name]} for name in fits}
    doc = {
        "version": VERSION, "pair": run_dir.name, "family": config.get("family"), "strategy": "probe",
        "random_init": random_init, "warning": RANDOM_FLAG if random_init else None,
        "run": {"dir": str(run_dir.resolve()), "model_sha256": model_sha,
                "config_sha256": sha256_file(run_dir / CONFIG), "model": config["backbone"]["name"],
                "weights": config["weights"]},
        "dataset": {"path": str(ds.root.resolve()), "hash": ds.content_hash()},
        "test": {"n_images": int(len(rows_test)), "ids_sha256": test_hash,
                 "used_for": "scoring only; every selection reads train and validation rows"},
        "train": {"n_images": int(n_tr), "n_val": int(n_val), "features": train_src},
        "eval_features": eval_src,
        "long_tail": {"threshold": p.tail, "n_tags": int(bucket_masks(train_counts, p.tail, p.head)["tail"].sum()),
                      "definition": f"fewer than {p.tail} training images in the train split (stats.json)"},
        "probe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "groups": {"n": len(groups), "n_tags": int(sum(len(g) for g in groups))},
        "bootstrap": {"n_resamples": N_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": LEVEL, "method": "BCa",
                      "paired": "variant - baseline on the same resamples of the test images"},
        "rule": "a method helps only when the CI of its difference from the baseline lies above 0, hurts when it "
                "lies below 0, and otherwise does not help",
        "baseline": BASELINE,
        "variants": described,
        "rebalance_on_validation": rebalance_on_validation(described),
        "skipped": skipped,
        "reproduces_run": reproduction(config, model, run_decision, fits, scores, bool(groups),
                                       _reference_eval(run_dir, model_sha, test_hash)),
        "device": str(dev), "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "versions": library_versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    doc = _json(doc)
    if write:
        write_json(run_dir / EVAL / ABLATION, doc)
    return doc


# --------------------------------------------------------------------------------------------- all runs


def _ci_text(x: float | None, ci: list | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    f = "{:+.4f}" if signed else "{:.4f}"
    body = f.format(x)
    if ci and ci[0] is not None:
        body += " [" + ", ".join(f.format(c) for c in ci) + "]"
    return body


def table_text(doc: dict) -> str:
    """The ablation of one run as a plain-text table."""
    body = []
    for name, v in doc["variants"].items():
        row = [name]
        for metric in METRICS:
            s = v["test"][metric]
            vs = s["vs_baseline"]
            row += [_ci_text(s["value"], s["ci"]),
                    "—" if name == doc["baseline"] else f"{_ci_text(vs['delta'], vs['ci'], True)} {vs['verdict']}"]
        sel, val = v["selected"], v["validation"]
        row.append(f"{_ci_text(val['tail_f1_crossfit'], None)} ± {_ci_text(val['tail_f1_crossfit_se'], None)}")
        row.append(f"wd {sel['weight_decay']:g}, tau {sel['tau']:g}, shrink {sel['shrink']:g}")
        body.append(row)
    lines = [f"{doc['pair']} ({doc['run']['model']}): each method vs {doc['baseline']} on the test split "
             f"({doc['test']['n_images']} images; {doc['bootstrap']['level']:.0%} BCa CIs, paired bootstrap over "
             f"{doc['bootstrap']['n_resamples']} resamples; long tail = {doc['long_tail']['definition']})",
             render(("variant", "macro-F1 [CI]", "Δ vs baseline [CI]", "tail-F1 [CI]", "Δ tail [CI]",
                     "val tail-F1 ± SE", "selected on validation"), body)]
    lines += [f"re-sampling chosen on validation, {c['with']} vs {c['without']}: {c['choice']}"
              for c in doc["rebalance_on_validation"]["choices"]]
    lines += [f"skipped {k}: {why}" for k, why in doc["skipped"].items()]
    if doc["random_init"]:
        lines.append(f"({RANDOM_FLAG})")
    return "\n".join(lines)


def ablate_all(runs_dir: str | Path, data: str | Path | Dataset, *, pairs: Sequence[str] | None = None,
               force: bool = False, device: str = "auto", batch_size: int = 128, progress: bool = False,
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Ablate every complete probe run under ``runs_dir`` (or ``pairs``); pair -> ablation.json content, or
    ``{"status": "skipped" | "refused", "reason": ...}``. A current ablation is kept unless ``force``."""
    ds = data if isinstance(data, Dataset) else load_dataset(data)
    results: dict[str, dict] = {}
    for run_dir in run_dirs(runs_dir, pairs):
        pair = run_dir.name
        if not is_complete(run_dir):
            results[pair] = {"status": "skipped", "reason": f"{run_dir}: incomplete run"}
            log(f"{pair}: skipped, the run is incomplete")
            continue
        if read_json(run_dir / CONFIG).get("strategy") != "probe":
            results[pair] = {"status": "skipped", "reason": "not a linear-probe run"}
            if pairs is not None:
                log(f"{pair}: skipped, the ablation is for linear-probe runs")
            continue
        if not force and (done := current_ablation(run_dir, ds)) is not None:
            results[pair] = done
            log(f"{pair}: ablation is current (same checkpoint, dataset and test rows), kept (--force redoes it)")
            log(table_text(done))
            continue
        log(f"{pair}: ablation ...")
        try:
            doc = ablate_run(run_dir, ds, device=device, batch_size=batch_size, progress=progress, log=log)
        except (RunError, DatasetError, ValueError, OSError) as e:
            results[pair] = {"status": "refused", "reason": str(e)}
            log(f"{pair}: REFUSED: {e}")
            continue
        results[pair] = doc
        log(table_text(doc))
        log(f"{pair}: wrote {run_dir / EVAL / ABLATION} in {doc['seconds']['total']:.1f} s")
    return results


def parser() -> argparse.ArgumentParser:
    from bakeoff.train.project import PROJECT_FILE

    p = argparse.ArgumentParser(prog="python -m evaluate.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", help=f"runs directory (default: ./{PROJECT_FILE}'s)")
    p.add_argument("--data", help=f"dataset directory the runs were trained on (default: ./{PROJECT_FILE}'s)")
    p.add_argument("--pairs", type=lambda s: [v for v in s.split(",") if v],
                   help="comma-separated probe runs (default: every probe run)")
    p.add_argument("--force", action="store_true", help="redo ablations that are already current")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=128, help="feature extraction batch size")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from bakeoff.train.project import fill

    p = parser()
    args = setup_logging(add_verbosity_flags(p).parse_args(sys.argv[1:] if argv is None else argv))
    fill(p, args, {"runs": "runs", "data": "data"})
    setup_threads()
    try:
        results = ablate_all(args.runs, args.data, pairs=args.pairs, force=args.force, device=args.device,
                             batch_size=args.batch_size, progress=not args.no_progress)
    except (RunError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [k for k, r in results.items() if r.get("status") == "refused"]
    if not any("variants" in r for r in results.values()):
        print(f"no probe run was ablated under {args.runs}", file=sys.stderr)
        return 1
    if bad:
        print(f"{len(bad)} runs refused: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
