"""One (backbone, strategy) run end to end, and the run-directory contract (DESIGN.md).

``RUNS/<family>-<strategy>/``: ``config.json`` (status "running" until the end, "complete" written last),
``model.safetensors`` (the whole TaggingModel), ``thresholds.json``, ``history.jsonl``, ``timing.json``,
``resume/`` (fine-tune resume state). Feature and trunk caches live in ``RUNS/.cache/<key>/``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from train.data.cache import build_cache, load_cache
from train.data.dataset import Dataset, load_dataset
from train.data.io import atomic_path, read_json, write_json
from train.data.splits import iterative_stratification
from train.device import device_name, library_versions, pick_device, setup_threads
from train.features import FeatureStore, cache_key, extract, extraction_seconds
from train.finetune import FinetuneConfig, ImageSource, TrunkSource, finetune, predict_from_trunk
from train.losses import MultiLabelLoss, class_balanced_pos_weight
from train.preprocess import Preprocess, preprocess_config
from train.probe import ProbeConfig, train_probe
from train.registry import BackboneSpec, TaggingModel, get_spec
from train.thresholds import fit_thresholds
from train.weights import RANDOM_FLAG, WeightsInfo, create_backbone

STRATEGIES = ("probe", "ft")
CONFIG, MODEL, THRESHOLDS, HISTORY, TIMING = "config.json", "model.safetensors", "thresholds.json", "history.jsonl", "timing.json"
# Per-family fine-tune learning rates for the last 4 blocks (DINOv2 wants ~1e-5: dinov2 #252).
BLOCK_LR = {"cnn": 3e-4, "dinov2": 2e-5, "clip": 3e-5}


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
    cache_size: int = 128
    max_train_images: int | None = None
    loss: str = "bce"
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


def read_run(run_dir: str | Path, ds: Dataset | None = None) -> tuple[dict, np.ndarray]:
    """(config, thresholds) of a complete run without building its model; refuses incomplete runs and
    taxonomy mismatches."""
    run_dir = Path(run_dir)
    if not is_complete(run_dir):
        raise RunError(f"{run_dir}: not a complete run (no {CONFIG} with status 'complete'); train it first")
    config = read_json(run_dir / CONFIG) | {"run_dir": str(run_dir)}
    if ds is not None and config["taxonomy"] != ds.taxonomy:
        raise RunError(f"{run_dir / CONFIG}: the checkpoint's taxonomy ({len(config['taxonomy'])} tags) differs from "
                       f"dataset {ds.root} ({len(ds.taxonomy)} tags); it was trained on another dataset")
    return config, np.asarray(read_json(run_dir / THRESHOLDS)["thresholds"], dtype=np.float64)


def load_run(run_dir: str | Path, ds: Dataset | None = None, device: torch.device | str = "cpu") -> tuple[TaggingModel, dict, np.ndarray]:
    """(model, config, thresholds) of a complete run; refuses incomplete runs and taxonomy mismatches."""
    config, thresholds = read_run(run_dir, ds)
    return build_model(config, device), config, thresholds


def _probe_head_for(out: Path, spec: BackboneSpec, winfo: WeightsInfo, ds: Dataset) -> tuple[dict, torch.Tensor, torch.Tensor] | None:
    """The head of a complete probe run of the same model, weights and dataset (for LP-then-FT)."""
    run_dir = out / pair_name(spec.family, "probe")
    if not is_complete(run_dir):
        return None
    cfg = read_json(run_dir / CONFIG)
    if (cfg["backbone"]["name"], cfg["backbone"]["img_size"], cfg["weights"], cfg["dataset"]["hash"]) != (
            spec.name, spec.img_size, winfo.to_dict(), ds.content_hash()):
        return None
    state = load_file(str(run_dir / MODEL))
    return cfg, state["head.weight"], state["head.bias"]


def train_pair(data: str | Path, out: str | Path, opts: RunOptions) -> Path:
    """Train one (backbone, strategy) pair into ``out/<family>-<strategy>``; returns the run directory."""
    if opts.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {opts.strategy!r}; choose from {STRATEGIES}")
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    reused: dict[str, bool] = {}  # caches found complete: their timing is the compute time recorded when made
    setup_threads()
    device = pick_device(opts.device)
    ds = load_dataset(data)
    stats = ds.stats()
    out = Path(out)
    run_dir = out / pair_name(opts.family, opts.strategy)
    spec = get_spec(opts.family, opts.model, opts.image_size)
    if run_dir.exists() and not opts.resume:
        for name in (CONFIG, MODEL, THRESHOLDS, HISTORY, TIMING, "resume/resume.json", "resume/resume.safetensors"):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    backbone, winfo = create_backbone(spec, opts.weights, opts.weights_dir, opts.seed)
    timing["weights_load"] = time.perf_counter() - t
    if winfo.is_random:
        print(f"WARNING {pair_name(opts.family, opts.strategy)}: {spec.name} with {RANDOM_FLAG}")
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
    pos_weight = class_balanced_pos_weight(train_counts, len(ds.split_indices("train"))) if opts.loss == "balanced" else None
    loss_fn = MultiLabelLoss(opts.loss, pos_weight)
    rows = np.concatenate([rows_train, rows_val])
    key_parts = dict(model=spec.to_dict(), weights=winfo.to_dict(), preprocess=prep_cfg, dataset=ds.content_hash(),
                     rows=cache_key(rows=rows.tolist()))
    config = {
        "status": "running",
        "pair": pair_name(opts.family, opts.strategy),
        "family": opts.family,
        "strategy": opts.strategy,
        "backbone": spec.to_dict(),
        "weights": winfo.to_dict(),
        "preprocess": prep_cfg,
        "last_blocks": "last 4 blocks + final norm/conv are trained" if opts.strategy == "ft" else "frozen",
        "dataset": {"path": str(ds.root.resolve()), "hash": ds.content_hash(), "n_images": len(ds),
                    "n_train_used": int(len(rows_train)), "n_val": int(len(rows_val)),
                    "split_seed": ds.split_meta.get("seed")},
        "taxonomy": ds.taxonomy,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("probe", "progress")},
        "device": device_name(device),
        "versions": library_versions(),
    }
    write_json(run_dir / CONFIG, config)

    if opts.strategy == "probe":
        store = FeatureStore(out / ".cache", "features-" + cache_key(**key_parts, what="features"))
        reused["features"] = store.complete
        feats = extract(backbone, preprocess, images, rows, store, ("features",), batch_size=opts.batch_size,
                        progress=opts.progress, describe={"model": spec.name, "rows": len(rows)})["features"]
        timing["feature_extraction"] = extraction_seconds(store)
        x = np.asarray(feats, dtype=np.float32)
        probe_cfg = ProbeConfig(**{**asdict(opts.probe), "loss": opts.loss, "seed": opts.seed})
        result = train_probe(x[:len(rows_train)], y_train, x[len(rows_train):], y_val, probe_cfg, loss_fn, device)
        timing["head_training"] = result.seconds
        model.head.load_state_dict(result.head.state_dict())
        for rec in result.history:
            _append_history(run_dir, rec)
        with torch.no_grad():
            val_scores = torch.sigmoid(result.head(torch.from_numpy(x[len(rows_train):]))).numpy()
        summary = {"probe": asdict(probe_cfg), "sweep": result.sweep, "selected": result.best}
        n_trained = sum(p.numel() for p in model.head.parameters())
    else:
        cfg = FinetuneConfig(epochs=opts.epochs or FinetuneConfig.epochs, batch_size=opts.batch_size,
                             lr=opts.lr or BLOCK_LR[spec.family], augment=opts.augment, loss=opts.loss, seed=opts.seed)
        lp = _probe_head_for(out, spec, winfo, ds)
        if lp is not None:
            with torch.no_grad():
                model.head.weight.copy_(lp[1])
                model.head.bias.copy_(lp[2])
        if opts.augment:
            train_src = ImageSource(model, images, rows_train, preprocess, augment=True, seed=opts.seed)
            val_src = ImageSource(model, images, rows_val, preprocess)
        else:
            store = FeatureStore(out / ".cache", "trunk-" + cache_key(**key_parts, what="trunk", dtype=opts.trunk_cache_dtype))
            reused["trunk"] = store.complete
            trunk = extract(backbone, preprocess, images, rows, store, ("trunk",), batch_size=opts.batch_size,
                            dtype=opts.trunk_cache_dtype, progress=opts.progress,
                            describe={"model": spec.name, "rows": len(rows)})["trunk"]
            train_src = TrunkSource(trunk[:len(rows_train)], device)
            val_src = TrunkSource(trunk[len(rows_train):], device)
            timing["trunk_caching"] = extraction_seconds(store)
        ft = finetune(model, train_src, y_train, val_src, y_val, cfg, run_dir / "resume", loss_fn, opts.resume,
                      log=lambda rec: _append_history(run_dir, rec), progress=opts.progress)
        if not ft["finished"]:
            raise RunError(f"{run_dir}: fine-tune stopped before finishing; rerun with --resume")
        timing["block_training"] = ft["seconds"]
        val_scores = predict_from_trunk(model, val_src, len(rows_val))
        summary = {"finetune": asdict(cfg), "result": ft,
                   "init_head": f"linear probe ({out / pair_name(spec.family, 'probe')})" if lp else "zeros+prior"}
        n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)

    t = time.perf_counter()
    thresholds = fit_thresholds(y_val, val_scores)
    timing["thresholds"] = time.perf_counter() - t
    save_model(run_dir / MODEL, model)
    write_json(run_dir / THRESHOLDS, {"thresholds": thresholds.tolist(), "tags": ds.taxonomy, "score": "sigmoid",
                                      "rule": "score >= threshold", "fitted_on": "val"})
    # total = the compute this run cost, reused caches counted at their recorded cost; wall = this process
    timing["total"] = sum(timing.values())
    timing["wall"] = time.perf_counter() - t_start
    n_seen = len(rows)
    extraction = timing.get("feature_extraction") or timing.get("trunk_caching") or 0.0
    write_json(run_dir / TIMING, {"seconds": {k: round(v, 3) for k, v in timing.items()}, "device": device_name(device),
                                  "extraction_images_per_s": round(n_seen / extraction, 1) if extraction > 0.5 else None,
                                  "images": {"train": int(len(rows_train)), "val": int(len(rows_val))},
                                  "caches_reused": reused})
    config |= {"status": "complete", "summary": summary, "params_trained": int(n_trained),
               "params_total": int(sum(p.numel() for p in model.parameters()))}
    write_json(run_dir / CONFIG, config)
    return run_dir
