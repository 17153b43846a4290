"""One (backbone, strategy) run end to end, and the run-directory contract (DESIGN.md).

``RUNS/<family>-<strategy>/``: ``config.json`` (status "running" until the end, "complete" written last),
``model.safetensors`` (the whole TaggingModel), ``thresholds.json``, ``history.jsonl``, ``timing.json``,
``resume/`` (fine-tune resume state). Feature and trunk caches live in ``RUNS/.cache/<key>/``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from train.data.cache import build_cache, load_cache
from train.data.dataset import Dataset, load_dataset
from train.data.io import atomic_path, read_json, write_json
from train.data.splits import iterative_stratification
from train.decision import Decision
from train.device import device_name, library_versions, pick_device, setup_threads
from train.decision import single_valued_groups
from train.features import cache_key, predict_logits
from train.heads import HeadLoss, group_log_prior
from train.losses import class_balanced_pos_weight
from train.preprocess import Preprocess, preprocess_config
from train.probe import ProbeConfig
from train.profiles import cache_warning
from train.registry import BackboneSpec, TaggingModel, get_spec
from train.selection import fit_decision
from train.strategies import STRATEGIES, Context
from train.weights import RANDOM_FLAG, WeightsInfo, create_backbone

HEADS = ("field", "sigmoid")  # field: softmax per single-valued field (where the data has one); sigmoid: per tag
CONFIG, MODEL, THRESHOLDS, HISTORY, TIMING = "config.json", "model.safetensors", "thresholds.json", "history.jsonl", "timing.json"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (stale, mismatched, incomplete)."""


@dataclass
class RunOptions:
    family: str
    strategy: str
    model: str | None = None
    weights: str = "pretrained"
    weights_dir: str | None = None
    image_size: int | None = None
    cache_size: int | None = None  # None: the model's input size (never upsample a larger photo)
    max_train_images: int | None = None
    loss: str = "bce"
    head: str = "field"
    logit_adjust: float | None = None  # tau; None: selected on validation
    threshold_shrink: float | None = None  # strength; None: selected by cross-fitting on validation
    trials: int = 8  # hyper-parameter trials per pair (probe: weight decays; fine-tune: learning rates)
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    augment: bool = False
    trunk_cache_dtype: str = "float16"
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    progress: bool = True
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    profile: dict | None = None  # {"name", "reductions"}: what the settings reduce against the full profile


def pair_name(family: str, strategy: str) -> str:
    return f"{family}-{strategy}"


def is_complete(run_dir: Path) -> bool:
    cfg = run_dir / CONFIG
    return cfg.exists() and read_json(cfg).get("status") == "complete"


def train_rows(ds: Dataset, max_images: int | None, seed: int) -> np.ndarray:
    """Train rows, or a stratified subset of ``max_images`` of them (val and test untouched)."""
    rows = ds.split_indices("train")
    if not max_images or max_images >= len(rows):
        return rows
    parts = iterative_stratification(ds.labels()[rows], {"keep": max_images, "rest": len(rows) - max_images}, seed)
    return rows[parts["keep"]]


def _append_history(run_dir: Path, rec: dict) -> None:
    with open(run_dir / HISTORY, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def save_model(path: Path, model: TaggingModel) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def build_model(config: dict, device: torch.device | str = "cpu") -> TaggingModel:
    """Rebuild a run's model from its config (architecture only, no download) and load its weights."""
    spec = BackboneSpec(**{**config["backbone"], "mean": tuple(config["backbone"]["mean"]),
                           "std": tuple(config["backbone"]["std"])})
    backbone, _ = create_backbone(spec, "random")
    model = TaggingModel(backbone, len(config["taxonomy"]))
    state = load_file(str(Path(config["run_dir"]) / MODEL))
    model.load_state_dict(state)
    return model.to(device).eval()


def read_run(run_dir: str | Path, ds: Dataset | None = None) -> tuple[dict, Decision]:
    """(config, decision rule) of a complete run without building its model; refuses incomplete runs and
    taxonomy mismatches."""
    run_dir = Path(run_dir)
    if not is_complete(run_dir):
        raise RunError(f"{run_dir}: not a complete run (no {CONFIG} with status 'complete'); train it first")
    config = read_json(run_dir / CONFIG) | {"run_dir": str(run_dir)}
    if ds is not None and config["taxonomy"] != ds.taxonomy:
        raise RunError(f"{run_dir / CONFIG}: the checkpoint's taxonomy ({len(config['taxonomy'])} tags) differs from "
                       f"dataset {ds.root} ({len(ds.taxonomy)} tags); it was trained on another dataset")
    return config, Decision.from_json(read_json(run_dir / THRESHOLDS), config["taxonomy"])


def load_run(run_dir: str | Path, ds: Dataset | None = None, device: torch.device | str = "cpu") -> tuple[TaggingModel, dict, Decision]:
    """(model, config, decision rule) of a complete run; refuses incomplete runs and taxonomy mismatches."""
    config, decision = read_run(run_dir, ds)
    return build_model(config, device), config, decision


def _probe_head_for(out: Path, spec: BackboneSpec, winfo: WeightsInfo, ds: Dataset, head: str
                    ) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """The head of a complete probe run of the same model, weights, dataset and head kind (for LP-then-FT),
    with its logit adjustment taken back out (the fine-tune trains on plain logits)."""
    run_dir = out / pair_name(spec.family, "probe")
    if not is_complete(run_dir):
        return None
    cfg = read_json(run_dir / CONFIG)
    if (cfg["backbone"]["name"], cfg["backbone"]["img_size"], cache_weights(cfg["weights"]), cfg["dataset"]["hash"],
            cfg.get("options", {}).get("head", "sigmoid")) != (spec.name, spec.img_size, cache_weights(winfo.to_dict()),
                                                              ds.content_hash(), head):
        return None
    state = load_file(str(run_dir / MODEL))
    shift = np.asarray(cfg.get("decision", {}).get("bias_shift", np.zeros(len(ds.taxonomy))), dtype=np.float32)
    return state["head.weight"], state["head.bias"] - torch.from_numpy(shift), f"linear probe ({run_dir})"


def cache_weights(weights: dict) -> dict:
    """The part of a weights record that decides what a cache holds (not its human-readable notes)."""
    return {k: weights.get(k) for k in ("kind", "source", "sha256")}


def train_pair(data: str | Path, out: str | Path, opts: RunOptions) -> Path:
    """Train one (backbone, strategy) pair into ``out/<family>-<strategy>``; returns the run directory."""
    if opts.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {opts.strategy!r}; choose from {tuple(STRATEGIES)}")
    if opts.head not in HEADS:
        raise ValueError(f"unknown head {opts.head!r}; choose from {HEADS}")
    t_start = time.perf_counter()
    setup_threads()
    device = pick_device(opts.device)
    ds = load_dataset(data)
    stats = ds.stats()
    out = Path(out)
    run_dir = out / pair_name(opts.family, opts.strategy)
    spec = get_spec(opts.family, opts.model, opts.image_size)
    opts = replace(opts, cache_size=opts.cache_size or spec.img_size)
    if warning := cache_warning(spec.img_size, opts.cache_size):
        print(f"WARNING {pair_name(opts.family, opts.strategy)}: {warning}")
    if run_dir.exists() and not opts.resume:
        for name in (CONFIG, MODEL, THRESHOLDS, HISTORY, TIMING):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "resume", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    t = time.perf_counter()
    backbone, winfo = create_backbone(spec, opts.weights, opts.weights_dir, opts.seed)
    timing["weights_load"] = time.perf_counter() - t
    if winfo.is_random:
        print(f"WARNING {pair_name(opts.family, opts.strategy)}: {spec.name} with {RANDOM_FLAG}")
    if opts.strategy == "ft":
        print(f"{pair_name(opts.family, opts.strategy)}: {spec.name}: last 4 blocks = {backbone.describe_split()}")
    model = TaggingModel(backbone, len(ds.taxonomy)).to(device)
    prep_cfg = preprocess_config(spec, opts.cache_size)
    preprocess = Preprocess.from_config(prep_cfg, device)

    t = time.perf_counter()
    build_cache(ds, opts.cache_size, progress=opts.progress)
    images = load_cache(ds, opts.cache_size)
    timing["image_cache"] = time.perf_counter() - t

    rows_train = train_rows(ds, opts.max_train_images, opts.seed)
    rows_val = ds.split_indices("val")
    y = ds.labels()
    y_train, y_val = y[rows_train], y[rows_val]
    train_counts = np.asarray([stats["tags"][tg]["train"] for tg in ds.taxonomy])
    groups = single_valued_groups(y[ds.split_indices("train")], [ds.fields.get(tg, "") for tg in ds.taxonomy]) \
        if opts.head == "field" else []
    pos_weight = class_balanced_pos_weight(train_counts, len(ds.split_indices("train"))) if opts.loss == "balanced" else None
    loss_fn = HeadLoss(groups, opts.loss, pos_weight, n_tags=len(ds.taxonomy))
    rows = np.concatenate([rows_train, rows_val])
    key_parts = dict(model=spec.to_dict(), weights=cache_weights(winfo.to_dict()), preprocess=prep_cfg,
                     dataset=ds.content_hash(), rows=cache_key(rows=rows.tolist()))
    config = {
        "status": "running",
        "pair": pair_name(opts.family, opts.strategy),
        "family": opts.family,
        "strategy": opts.strategy,
        "backbone": spec.to_dict(),
        "native_img_size": get_spec(opts.family, opts.model).img_size,
        "weights": winfo.to_dict(),
        "preprocess": prep_cfg,
        "last_blocks": backbone.describe_split() if opts.strategy == "ft" else "frozen",
        "dataset": {"path": str(ds.root.resolve()), "hash": ds.content_hash(), "n_images": len(ds),
                    "n_train_used": int(len(rows_train)), "n_val": int(len(rows_val)),
                    "split_seed": ds.split_meta.get("seed")},
        "taxonomy": ds.taxonomy,
        "head": {"kind": opts.head, "groups": {ds.fields[ds.taxonomy[g[0]]]: len(g) for g in groups},
                 "loss": opts.loss},
        "options": {k: v for k, v in asdict(opts).items() if k not in ("probe", "progress", "profile")},
        "profile": opts.profile,
        "device": device_name(device),
        "versions": library_versions(),
    }
    write_json(run_dir / CONFIG, config)

    ctx = Context(model=model, family=spec.family, preprocess=preprocess, images=images, rows_train=rows_train,
                  rows_val=rows_val, y_train=y_train, y_val=y_val, loss=loss_fn, cache_root=out / ".cache",
                  key_parts=key_parts, run_dir=run_dir, device=device, trials=opts.trials, batch_size=opts.batch_size,
                  epochs=opts.epochs, lr=opts.lr, augment=opts.augment, trunk_cache_dtype=opts.trunk_cache_dtype,
                  seed=opts.seed, progress=opts.progress, probe=opts.probe,
                  init_head=_probe_head_for(out, spec, winfo, ds, opts.head) if opts.strategy == "ft" else None,
                  log=lambda rec: _append_history(run_dir, rec), describe={"model": spec.name, "rows": len(rows)})
    outcome = STRATEGIES[opts.strategy](ctx)
    timing |= outcome.timing

    # Validation logits as evaluation computes test logits (whole model, fp32, from the image cache; evaluation
    # batches differ, so equal to float rounding): the decision rule is fitted on these, not on the cached,
    # bf16 scores training selected on.
    t = time.perf_counter()
    val_logits = predict_logits(model, preprocess, images, rows_val, batch_size=opts.batch_size, progress=opts.progress)
    timing["validation_pass"] = time.perf_counter() - t
    t = time.perf_counter()
    fitted = fit_decision(y_val, val_logits, groups, train_counts, stats.get("long_tail_threshold", 50),
                          stats.get("head_threshold", 500), opts.logit_adjust, opts.threshold_shrink, opts.seed)
    shift = -fitted.tau * group_log_prior(train_counts, groups, len(ds.taxonomy))
    with torch.no_grad():  # logit adjustment folded into the bias: every runtime outputs adjusted logits
        model.head.bias.add_(torch.as_tensor(shift, dtype=model.head.bias.dtype, device=model.head.bias.device))
    timing["thresholds"] = time.perf_counter() - t
    save_model(run_dir / MODEL, model)
    write_json(run_dir / THRESHOLDS, fitted.decision.to_json(ds.taxonomy, fitted_on="val", val_scores="whole model, fp32, from the image cache (as evaluation scores test)"))
    # total = the compute this run cost, reused caches counted at their recorded cost; wall = this process
    timing["total"] = sum(timing.values())
    timing["wall"] = time.perf_counter() - t_start
    extraction = timing.get("feature_extraction") or timing.get("trunk_caching") or 0.0
    write_json(run_dir / TIMING, {"seconds": {k: round(v, 3) for k, v in timing.items()}, "device": device_name(device),
                                  "extraction_images_per_s": round(len(rows) / extraction, 1) if extraction > 0.5 else None,
                                  "images": {"train": int(len(rows_train)), "val": int(len(rows_val))},
                                  "caches_reused": outcome.reused})
    summary = outcome.summary | {"selection": fitted.report.pop("selection")}
    config |= {"status": "complete", "summary": summary, "decision": {**fitted.report, "bias_shift": shift.tolist()},
               "params_trained": int(outcome.params_trained),
               "params_total": int(sum(p.numel() for p in model.parameters()))}
    write_json(run_dir / CONFIG, config)
    return run_dir
