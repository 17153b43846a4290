"""One (backbone, strategy) run end to end, and the run-directory contract (DESIGN.md).

``RUNS/<family>-<strategy>/``: ``config.json`` (status "running" until the end, "complete" written last),
``model.safetensors`` (the whole TaggingModel), ``thresholds.json``, ``history.jsonl``, ``timing.json``,
``resume/`` (fine-tune resume state), ``.lock``. Feature and trunk caches live in ``RUNS/.cache/<key>/``, the probe's
augmented views' features in ``RUNS/.cache/view-<key>/`` (one per view). config.json ``options`` records every option,
``rebalance`` and ``aug_views`` among them; ``summary.crt`` / ``summary.aug_views`` say what they did.

Concurrency (:mod:`bakeoff.common.lock`): a training holds its run directory's lock (``.lock``) from start to end;
a second process asked to train the same pair stops at once with :class:`RunLocked`, naming the holder (pid, host,
since, command), rather than wait for a training that may take hours and then retrain or overwrite it. The caches
it uses are locked while built, and shared: a second process waits and reuses them. A fine-tune starts from the head
of the matching probe run (LP-then-FT, :func:`init_head`): while another process trains that probe, it waits for
the probe's run lock; with no matching probe it says so loudly, starts from a zero head and records it in
config.json ``init_head`` (``kind`` "zero", the probe run it looked for and why it could not use it), and
:mod:`train.current` counts it stale once that probe exists.

Under torchrun (:mod:`bakeoff.common.distributed`) the ranks are one run: rank 0 holds the run's lock and writes
every file of the run directory once (config.json records ``world_size``); the ranks share the image cache's
decoding, the feature/trunk extraction and the fine-tune's steps (DDP); the probe's head sweep and the decision
rule are fitted by rank 0 alone.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bakeoff.common.device import device_name, library_versions, pick_device, setup_threads
from bakeoff.common.distributed import world
from bakeoff.common.io import atomic_path, read_json, write_json
from bakeoff.common.lock import Locked, describe, hold
from bakeoff.train.colour import ColourConfig, ColourHistogram
from bakeoff.train.data.cache import build_cache, load_cache
from bakeoff.train.data.dataset import Dataset, load_dataset
from bakeoff.train.data.splits import iterative_stratification
from bakeoff.train.decision import Decision, single_valued_groups
from bakeoff.train.features import cache_key, predict_logits
from bakeoff.train.heads import HeadLoss, group_log_prior
from bakeoff.train.losses import class_balanced_pos_weight
from bakeoff.train.preprocess import Preprocess, preprocess_config
from bakeoff.train.probe import ProbeConfig
from bakeoff.train.profiles import cache_warning
from bakeoff.train.rebalance import REBALANCE, repeat_threshold
from bakeoff.train.registry import BackboneSpec, TaggingModel, get_spec
from bakeoff.train.selection import fit_decision
from bakeoff.train.strategies import STRATEGIES, Context
from bakeoff.train.weights import RANDOM_FLAG, WeightsInfo, create_backbone

HEADS = ("field", "sigmoid")  # field: softmax per single-valued field (where the data has one); sigmoid: per tag
CONFIG, MODEL, THRESHOLDS, HISTORY, TIMING = "config.json", "model.safetensors", "thresholds.json", "history.jsonl", "timing.json"
LOCK = ".lock"
InitHead = tuple[torch.Tensor, torch.Tensor, str]  # LP-then-FT: (head weight, head bias, where they come from)


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (stale, mismatched, incomplete)."""


class RunLocked(RunError):
    """The run directory is in use by another process."""


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
    augment: bool = False  # fine-tune only (light flip + shift, uncached trunk); the probe's is aug_views
    trunk_cache_dtype: str = "float16"
    rebalance: str = "none"  # train.rebalance.REBALANCE: "crt" trains the head on a repeat-factor re-sample
    aug_views: int = 0  # K cached augmented views per training image (train.views): probe features, fine-tune trunks
    colour: bool = False  # the head also sees the image's colour histograms (train.colour)
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
    model = TaggingModel(backbone, len(config["taxonomy"]), colour_module(config.get("colour"), spec))
    state = load_file(str(Path(config["run_dir"]) / MODEL))
    model.load_state_dict(state)
    return model.to(device).eval()


def colour_module(record: dict | None, spec: BackboneSpec) -> ColourHistogram | None:
    """The model's colour histograms from config.json's ``colour`` record (None: a model without them)."""
    return None if record is None else ColourHistogram(ColourConfig.from_dict(record), spec.mean, spec.std)


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


def _start_identity(backbone: dict, weights: dict, dataset_hash: str, head: str, colour: bool) -> dict[str, str]:
    """What a fine-tune and the probe it starts from must share: model, input size, weights, dataset, head kind and
    input (with or without colour histograms)."""
    w = cache_weights(weights)
    return {"model": backbone["name"], "image_size": str(backbone["img_size"]), "dataset": dataset_hash[:12],
            "weights": " ".join(str(v) for v in (w["kind"], w["source"], w["sha256"]) if v), "head": head,
            "colour histograms": "yes" if colour else "no"}


def probe_mismatch(probe_dir: Path, backbone: dict, weights: dict, dataset_hash: str, head: str,
                   colour: bool = False) -> str:
    """Why the run in ``probe_dir`` cannot start a fine-tune of ``backbone`` (LP-then-FT); "" when it can: a
    complete probe run of the same model, input size, weights, dataset, head kind and head input."""
    if not is_complete(probe_dir):
        return f"no complete probe run in {probe_dir}"
    cfg = read_json(probe_dir / CONFIG)
    options = cfg.get("options", {})
    found = _start_identity(cfg["backbone"], cfg["weights"], cfg["dataset"]["hash"], options.get("head", "sigmoid"),
                            options.get("colour", False))
    asked = _start_identity(backbone, weights, dataset_hash, head, colour)
    diff = [f"{k} {found[k]} (this fine-tune: {asked[k]})" for k in asked if found[k] != asked[k]]
    return f"the probe run in {probe_dir} was trained with another {', '.join(diff)}" if diff else ""


def init_head(out: Path, spec: BackboneSpec, winfo: WeightsInfo, ds: Dataset, head: str, colour: bool = False
              ) -> tuple[InitHead | None, dict]:
    """The fine-tune's start: the head of the matching probe run ``out/<family>-probe`` (LP-then-FT), with its
    logit adjustment taken back out (the fine-tune trains on plain logits), read under the probe's run lock, so
    waiting while another process trains it; else None, said loudly. Also returns config.json's ``init_head``."""
    pair, probe_dir = pair_name(spec.family, "ft"), out / pair_name(spec.family, "probe")
    record = {"probe_run": str(probe_dir.resolve())}
    why = f"no probe run in {probe_dir}"
    if probe_dir.is_dir():
        with hold(probe_dir / LOCK, f"{pair}: reading the head of {probe_dir}", wait=True):
            why = probe_mismatch(probe_dir, spec.to_dict(), winfo.to_dict(), ds.content_hash(), head, colour)
            if not why:
                cfg, state = read_json(probe_dir / CONFIG), load_file(str(probe_dir / MODEL))
                shift = np.asarray(cfg.get("decision", {}).get("bias_shift", np.zeros(len(ds.taxonomy))), np.float32)
                return ((state["head.weight"], state["head.bias"] - torch.from_numpy(shift),
                         f"linear probe ({probe_dir})"), {"kind": "probe", **record})
    print(f"WARNING {pair}: starts from a ZERO head, not from its linear probe's (LP-then-FT): {why}. Recorded in "
          f"config.json init_head; once a matching {pair_name(spec.family, 'probe')} run exists, this fine-tune "
          "counts as stale and python -m train retrains it from the probe's head")
    return None, {"kind": "zero", **record, "reason": why}


def cache_weights(weights: dict) -> dict:
    """The part of a weights record that decides what a cache holds (not its human-readable notes)."""
    return {k: weights.get(k) for k in ("kind", "source", "sha256")}


def train_pair(data: str | Path, out: str | Path, opts: RunOptions, *, share_pass: bool = False) -> Path:
    """Train one (backbone, strategy) pair into ``out/<family>-<strategy>``; returns the run directory. Holds the
    run directory's lock throughout; raises :class:`RunLocked`, naming the holder, when another process holds it.
    ``share_pass`` (a probe; how it runs, not what it learns, so not an option): its feature extraction also fills
    the frozen-trunk cache of the fine-tune with the same options, which then reuses it (one pass per backbone)."""
    if opts.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {opts.strategy!r}; choose from {tuple(STRATEGIES)}")
    if opts.head not in HEADS:
        raise ValueError(f"unknown head {opts.head!r}; choose from {HEADS}")
    if opts.rebalance not in REBALANCE:
        raise ValueError(f"unknown rebalance {opts.rebalance!r}; choose from {REBALANCE}")
    if opts.aug_views < 0:
        raise ValueError(f"aug_views must be >= 0, not {opts.aug_views}")
    if opts.strategy == "ft" and opts.augment and opts.aug_views:
        raise ValueError("augment (flip + shift computed every step) and aug_views (cached crop + flip views) are two "
                         "ways to augment the fine-tune: choose one")
    run_dir = Path(out) / pair_name(opts.family, opts.strategy)
    w = world()
    with contextlib.ExitStack() as stack:
        refused = ""
        if w.main:  # the ranks of one torchrun job are one training: rank 0 holds the lock for all of them
            try:
                stack.enter_context(hold(run_dir / LOCK, f"training {run_dir.name}", wait=False))
            except Locked as e:
                refused = (f"{run_dir} is in use by {describe(e.holder)}. Wait for it to finish or stop it (its lock "
                           "goes when it exits, also if it crashes), then run this again")
        if refused := w.broadcast(refused):
            raise RunLocked(refused)
        _train(data, Path(out), run_dir, opts, share_pass)
        w.barrier()  # every rank returns once rank 0 has written the run
        return run_dir


def _train(data: str | Path, out: Path, run_dir: Path, opts: RunOptions, share_pass: bool) -> None:
    """:func:`train_pair`'s work, with the run directory's lock held."""
    t_start = time.perf_counter()
    setup_threads()
    w = world()
    device = pick_device(opts.device)
    if w.distributed and device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
    ds = load_dataset(data)
    stats = ds.stats()
    spec = get_spec(opts.family, opts.model, opts.image_size)
    opts = replace(opts, cache_size=opts.cache_size or spec.img_size)
    if (warning := cache_warning(spec.img_size, opts.cache_size)) and w.main:
        print(f"WARNING {pair_name(opts.family, opts.strategy)}: {warning}")
    previous = read_json(run_dir / CONFIG) if opts.resume and (run_dir / CONFIG).is_file() else {}
    if not opts.resume and w.main:
        for name in (CONFIG, MODEL, THRESHOLDS, HISTORY, TIMING):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "resume", ignore_errors=True)
    timing: dict[str, float] = {}

    t = time.perf_counter()
    backbone, winfo = create_backbone(spec, opts.weights, opts.weights_dir, opts.seed)
    timing["weights_load"] = time.perf_counter() - t
    if winfo.is_random and w.main:
        print(f"WARNING {pair_name(opts.family, opts.strategy)}: {spec.name} with {RANDOM_FLAG}")
    if opts.strategy == "ft" and w.main:
        print(f"{pair_name(opts.family, opts.strategy)}: {spec.name}: last 4 blocks = {backbone.describe_split()}")
    colour = ColourConfig().to_dict() if opts.colour else None
    model = TaggingModel(backbone, len(ds.taxonomy), colour_module(colour, spec)).to(device)
    prep_cfg = preprocess_config(spec, opts.cache_size)
    preprocess = Preprocess.from_config(prep_cfg, device)

    t = time.perf_counter()
    build_cache(ds, opts.cache_size, progress=opts.progress, world=w)  # under torchrun the ranks share it
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
    start, init = (None, None)
    if opts.strategy == "ft":  # rank 0 reads the probe's head (under its lock) for every rank
        start, init = w.broadcast(init_head(out, spec, winfo, ds, opts.head, opts.colour) if w.main else None)
    if init and previous.get("init_head", init)["kind"] != init["kind"] and w.main:
        print(f"{run_dir.name}: its interrupted trials started from a {previous['init_head']['kind']} head, this start "
              f"is a {init['kind']} head: starting them over")
        shutil.rmtree(run_dir / "resume", ignore_errors=True)
        (run_dir / HISTORY).unlink(missing_ok=True)
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
        **({"init_head": init} if init else {}),
        "dataset": {"path": str(ds.root.resolve()), "hash": ds.content_hash(), "n_images": len(ds),
                    "n_train_used": int(len(rows_train)), "n_val": int(len(rows_val)),
                    "split_seed": ds.split_meta.get("seed")},
        "taxonomy": ds.taxonomy,
        "head": {"kind": opts.head, "groups": {ds.fields[ds.taxonomy[g[0]]]: len(g) for g in groups},
                 "loss": opts.loss},
        "colour": colour,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("probe", "progress", "profile")},
        "profile": opts.profile,
        "device": device_name(device),
        "world_size": w.size,
        **({"distributed": {"backend": w.backend, "ranks": w.size, "batch_size": "global (split over the ranks)"}}
           if w.distributed else {}),
        "versions": library_versions(),
    }
    w.barrier()  # the ranks have read what they need of an earlier run before rank 0 rewrites it
    if w.main:
        write_json(run_dir / CONFIG, config)

    ctx = Context(model=model, family=spec.family, preprocess=preprocess, images=images, rows_train=rows_train,
                  rows_val=rows_val, y_train=y_train, y_val=y_val, loss=loss_fn, cache_root=out / ".cache",
                  key_parts=key_parts, run_dir=run_dir, device=device, trials=opts.trials, batch_size=opts.batch_size,
                  epochs=opts.epochs, lr=opts.lr, augment=opts.augment, trunk_cache_dtype=opts.trunk_cache_dtype,
                  rebalance=opts.rebalance, aug_views=opts.aug_views,
                  repeat_threshold=repeat_threshold(stats.get("long_tail_threshold", 50), len(ds.split_indices("train"))),
                  seed=opts.seed, progress=opts.progress, probe=opts.probe,
                  init_head=start, share_pass=share_pass,
                  log=lambda rec: _append_history(run_dir, rec), describe={"model": spec.name, "rows": len(rows)})
    outcome = STRATEGIES[opts.strategy](ctx)
    if not w.main:
        return
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
