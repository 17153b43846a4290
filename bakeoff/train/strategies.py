"""The two transfer strategies behind one interface: ``STRATEGIES[name](ctx) -> Outcome``.

Both train the run's ``TaggingModel`` in place with the same head loss (:class:`train.heads.HeadLoss`) and
the same budget of hyper-parameter *trials*, each scored on validation mAP:
- ``probe``: a linear head on cached frozen features; the trials are the weight decays of the batched sweep.
  With ``aug_views`` K, it trains on the original training features + K cached augmented views of each
  training image (:mod:`train.views`, labels repeated); validation is never augmented.
- ``ft``: the last 4 blocks + head from the frozen-trunk cache (with ``aug_views`` K, also the cached trunks of
  K augmented views of each training image, one drawn per image and epoch; with ``augment``, from images), started
  from the probe's head when a matching probe run exists (LP-then-FT), else from a zero head (``init_head`` None:
  the caller says so and records it: :func:`bakeoff.train.run.init_head`). The trials are block learning rates
  on a log grid around the family's default; each trial is the whole schedule (warm-up, cosine decay to zero)
  compressed into ``trial_epochs``, and the best learning rate then trains the full schedule from the start.

``rebalance="crt"`` (:mod:`train.rebalance`): the representation stays as it is and the linear head is trained
anew, with the probe's weight-decay sweep, on a repeat-factor re-sample of the training set: the probe's head
directly; the fine-tune's after fine-tuning, on the fine-tuned model's pooled train + validation features.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bakeoff.common.device import autocast
from bakeoff.common.distributed import world
from bakeoff.common.io import read_json, write_json
from bakeoff.train.features import FeatureStore, Target, cache_key, extract_all, extraction_seconds
from bakeoff.train.finetune import (
    FinetuneConfig,
    ImageSource,
    Inputs,
    TrainingDiverged,
    TrunkSource,
    ViewTrunkSource,
    finetune,
)
from bakeoff.train.heads import HeadLoss, initial_bias
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.probe import DECAY_RANGE, ProbeConfig, ProbeResult, log_grid, train_probe
from bakeoff.train.rebalance import rebalanced
from bakeoff.train.registry import TaggingModel
from bakeoff.train.views import RECIPE, ViewImages

# Per-family fine-tune learning rates for the last 4 blocks (DINOv2 wants ~1e-5: dinov2 #252).
BLOCK_LR = {"cnn": 3e-4, "dinov2": 2e-5, "clip": 3e-5}
FT_LR_SPAN = 10.0  # the fine-tune's learning-rate grid spans default / sqrt(span) .. default * sqrt(span)


@dataclass
class Context:
    """What a strategy needs: the model, its inputs, the rows and labels, the loss, where to write."""

    model: TaggingModel
    family: str
    preprocess: Preprocess
    images: np.ndarray
    rows_train: np.ndarray
    rows_val: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray
    loss: HeadLoss
    cache_root: Path
    key_parts: dict
    run_dir: Path
    device: torch.device
    trials: int
    batch_size: int = 64
    epochs: int | None = None
    lr: float | None = None
    augment: bool = False
    trunk_cache_dtype: str = "float16"
    rebalance: str = "none"
    repeat_threshold: float = 0.0  # cRT's t (train.rebalance.repeat_threshold)
    aug_views: int = 0
    seed: int = 0
    progress: bool = True
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    init_head: tuple[torch.Tensor, torch.Tensor, str] | None = None  # LP-then-FT: (weight, bias, source)
    share_pass: bool = False  # probe: also fill the fine-tune's trunk store in its pass (the grid's one pass)
    log: Callable[[dict], None] = lambda rec: None
    describe: dict = field(default_factory=dict)


@dataclass
class Outcome:
    summary: dict
    params_trained: int
    timing: dict[str, float]
    reused: dict[str, bool]


def _store(ctx: Context, what: str, **extra) -> FeatureStore:
    return FeatureStore(ctx.cache_root, f"{what}-" + cache_key(**ctx.key_parts, what=what, **extra))


def trunk_store(ctx: Context) -> FeatureStore:
    """The frozen-trunk store of the fine-tune of this backbone, rows and preprocessing (the probe fills it too
    with ``share_pass``)."""
    return _store(ctx, "trunk", dtype=ctx.trunk_cache_dtype)


def colour_store(ctx: Context) -> FeatureStore:
    """The store of the model's colour histograms (``--colour``) for the training + validation rows, shared by the
    probe and the fine-tune of the same backbone and preprocessing."""
    return _store(ctx, "colour", colour=asdict(ctx.model.colour.cfg))


def view_stores(ctx: Context, what: str = "features") -> list[FeatureStore]:
    """One store of output ``what`` (the probe's ``features``, the fine-tune's ``trunk``, the ``colour`` of both)
    per augmented view 1..``aug_views`` of the training images, keyed by the backbone, the training rows, the seed,
    the view and its recipe: shared by every run of the backbone that asks for it."""
    parts = ctx.key_parts | {"rows": cache_key(rows=ctx.rows_train.tolist())}
    dtype = {"dtype": ctx.trunk_cache_dtype} if what == "trunk" else \
        {"colour": asdict(ctx.model.colour.cfg)} if what == "colour" else {}
    return [FeatureStore(ctx.cache_root, "view-" + cache_key(**parts, what=what, view=k, seed=ctx.seed,
                                                              recipe=RECIPE, **dtype))
            for k in range(1, ctx.aug_views + 1)]


def extract_views(ctx: Context, outputs: tuple[str, ...]) -> tuple[dict[str, list[np.ndarray]], float, bool]:
    """``outputs`` of each augmented view of the training images, one pass per view for all of them (the grid's
    probe fills the fine-tune's view trunks too; with ``--colour`` each view's histograms too). Returns ({output:
    [view 1, ..]}, extraction seconds, reused)."""
    outputs = (*outputs, *(("colour",) if ctx.model.colour is not None else ()))
    stores = {o: view_stores(ctx, o) for o in outputs}
    got: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for k in range(ctx.aug_views):
        targets = [Target(stores[o][k], (o,), ctx.trunk_cache_dtype if o == "trunk" else "float16") for o in outputs]
        arrays = extract_all(ctx.model.backbone, ctx.preprocess, ViewImages(ctx.images, ctx.seed, k + 1),
                             ctx.rows_train, targets, batch_size=ctx.batch_size, progress=ctx.progress,
                             side=ctx.model.colour,
                             describe=ctx.describe | {"rows": len(ctx.rows_train), "view": k + 1, "recipe": RECIPE})
        for o, a in zip(outputs, arrays):
            got[o].append(a[o])
    every = [vs for o in outputs for vs in stores[o]]
    return got, sum(extraction_seconds(vs) for vs in stores[outputs[0]]), not any(vs.built_here for vs in every)


def own_pass_seconds(stores: list[FeatureStore]) -> float:
    """The extraction seconds of those colour ``stores`` that were built in a pass of their own (the backbone's
    outputs already cached); one built in a pass with them shares that pass's seconds, counted there."""
    return sum(extraction_seconds(s) for s in stores
               if s.complete and read_json(s.dir / "meta.json").get("pass") == ["colour"])


def fit_head(ctx: Context, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray
             ) -> tuple[ProbeResult, ProbeConfig, dict | None]:
    """The weight-decay sweep of linear heads (on the cRT re-sample of the training rows when asked); the best
    head goes into the model. Returns (sweep result, its config, the re-sample's record or None)."""
    x_train, y_train, crt = rebalanced(x_train, y_train, ctx.rebalance, ctx.repeat_threshold, ctx.seed)
    cfg = replace(ctx.probe, weight_decays=log_grid(*DECAY_RANGE, ctx.trials), seed=ctx.seed)
    side = ctx.model.colour
    result = train_probe(x_train, y_train, x_val, ctx.y_val, cfg, ctx.loss, ctx.device, progress=ctx.progress,
                         shared_scale=None if side is None else slice(x_train.shape[1] - side.dim, None))
    ctx.model.head.load_state_dict(result.head.state_dict())
    return result, cfg, crt


def run_probe(ctx: Context) -> Outcome:
    """Extract (or reuse) frozen features (and augmented views), fit the weight-decay sweep, keep the best head.
    With ``share_pass`` the same pass fills the fine-tune's trunk store (:func:`trunk_store`); with ``--colour``
    it also fills the colour store, and the head trains on the features followed by the colour histograms."""
    rows = np.concatenate([ctx.rows_train, ctx.rows_val])
    store = _store(ctx, "features")
    targets = [Target(store, ("features",))]
    if ctx.share_pass:
        targets.append(Target(trunk_store(ctx), ("trunk",), ctx.trunk_cache_dtype))
    if ctx.model.colour is not None:
        targets.append(Target(colour_store(ctx), ("colour",)))
    arrays = extract_all(ctx.model.backbone, ctx.preprocess, ctx.images, rows, targets, batch_size=ctx.batch_size,
                         progress=ctx.progress, describe=ctx.describe, side=ctx.model.colour)
    feats = arrays[0]["features"]
    colours = arrays[-1]["colour"] if ctx.model.colour is not None else None
    reused = {"features": not store.built_here}
    n = len(ctx.rows_train)
    timing = {"feature_extraction": extraction_seconds(store)}
    if colours is not None:
        timing["colour_extraction"] = own_pass_seconds([targets[-1].store])
    if ctx.aug_views:  # validation is never augmented: views are of the training rows only
        extracted, timing["view_extraction"], reused["views"] = extract_views(
            ctx, ("features", "trunk") if ctx.share_pass else ("features",))
        if colours is not None:
            timing["colour_extraction"] += own_pass_seconds(view_stores(ctx, "colour"))
        view_feats = extracted["features"]
        if colours is not None:
            view_feats = [np.concatenate([f, c], axis=1) for f, c in zip(view_feats, extracted["colour"])]
    else:
        view_feats = []
    if not world().main:  # under torchrun the ranks share the extraction; rank 0 loads it and fits the heads
        return Outcome({}, 0, timing, reused)
    # the training features stay float16 here (the sweep makes the one float32 copy it standardises in place)
    if colours is not None:
        feats = np.concatenate([feats, colours], axis=1)
    x_train = np.concatenate([feats[:n], *view_feats])
    y_train = np.tile(ctx.y_train, (1 + len(view_feats), 1))
    result, cfg, crt = fit_head(ctx, x_train, y_train, np.asarray(feats[n:], dtype=np.float32))
    for rec in result.history:
        ctx.log(rec)
    views = len(view_feats)
    data = "train" + (f" + {views} augmented view{'s' * (views > 1)} per image" if views else "")
    data = f"a cRT re-sample of {data}" if crt else data
    searched = "weight decay (AdamW, decoupled" + (f"; head trained on {data})" if views or crt else ")")
    summary = {"probe": asdict(cfg), "sweep": result.sweep, "selected": result.best, "feature_cache": store.key,
               "tuning": {"trials": len(cfg.weight_decays), "searched": searched, "grid": list(cfg.weight_decays),
                          "selected_by": "validation macro mAP"}}
    if ctx.share_pass:
        summary["trunk_cache"] = targets[1].store.key  # filled in the same pass, for the fine-tune
    if views:
        summary["aug_views"] = {"views": views, "recipe": RECIPE, "caches": [vs.key for vs in view_stores(ctx)]}
    if crt:
        summary["crt"] = crt
    timing["head_training"] = result.seconds
    return Outcome(summary, sum(p.numel() for p in ctx.model.head.parameters()), timing, reused)


def finetune_lrs(family: str, lr: float | None, trials: int) -> tuple[float, ...]:
    """The block learning rates tried: a log grid spanning ``FT_LR_SPAN`` around ``lr`` (or the family
    default), with that rate itself in place of the grid point nearest to it."""
    base = lr or BLOCK_LR[family]
    if trials <= 1:
        return (base,)
    grid = list(log_grid(base / FT_LR_SPAN ** 0.5, base * FT_LR_SPAN ** 0.5, trials))
    grid[int(np.argmin([abs(np.log(g / base)) for g in grid]))] = base
    return tuple(grid)


@torch.no_grad()
def tail_features(model: TaggingModel, source: Callable[[np.ndarray], Inputs], n: int,
                  batch_size: int = 256) -> np.ndarray:
    """The head's input (float32: pooled features, then the side input where the model has one) of positions
    0..n-1 of a trunk ``source``: the tuned blocks run in bf16 autocast, as the probe's features are extracted."""
    model.eval()
    out = []
    for o in range(0, n, batch_size):
        h, side = source(np.arange(o, min(n, o + batch_size)))
        with autocast(h.device, True):
            out.append(model.head_input(model.backbone.tail(h).float(), side).cpu().numpy())
    return np.concatenate(out)


def run_finetune(ctx: Context) -> Outcome:
    """Fine-tune the last 4 blocks + head: ``trials`` learning rates, each a schedule of ``trial_epochs``, then the
    best one's full schedule (then, with cRT, the head trained anew on the fine-tuned features' re-sample)."""
    model, timing, reused = ctx.model, {}, {}
    with torch.no_grad():  # LP-then-FT, else a zero head at the training frequencies (as the probe starts)
        if ctx.init_head is not None:
            model.head.weight.copy_(ctx.init_head[0])
            model.head.bias.copy_(ctx.init_head[1])
        else:
            model.head.weight.zero_()
            model.head.bias.copy_(torch.as_tensor(initial_bias(ctx.y_train, ctx.loss.groups), dtype=torch.float32))
    n = len(ctx.rows_train)
    if ctx.augment:
        train_src = ImageSource(model, ctx.images, ctx.rows_train, ctx.preprocess, augment=True, seed=ctx.seed)
        val_src = ImageSource(model, ctx.images, ctx.rows_val, ctx.preprocess)
    else:
        rows = np.concatenate([ctx.rows_train, ctx.rows_val])
        store = trunk_store(ctx)
        targets = [Target(store, ("trunk",), ctx.trunk_cache_dtype)]
        if model.colour is not None:
            targets.append(Target(colour_store(ctx), ("colour",)))
        arrays = extract_all(model.backbone, ctx.preprocess, ctx.images, rows, targets, batch_size=ctx.batch_size,
                             progress=ctx.progress, describe=ctx.describe, side=model.colour)
        trunk, colours = arrays[0]["trunk"], arrays[-1].get("colour")
        reused["trunk"] = not store.built_here
        train_side, val_side = (None, None) if colours is None else (colours[:n], colours[n:])
        train_src = TrunkSource(trunk[:n], ctx.device, train_side)
        val_src = TrunkSource(trunk[n:], ctx.device, val_side)
        timing["trunk_caching"] = extraction_seconds(store)
        if model.colour is not None:
            timing["colour_extraction"] = own_pass_seconds([targets[-1].store])
        if ctx.aug_views:
            extracted, timing["view_extraction"], reused["views"] = extract_views(ctx, ("trunk",))
            if colours is not None:
                timing["colour_extraction"] += own_pass_seconds(view_stores(ctx, "colour"))
            train_src = ViewTrunkSource([trunk[:n], *extracted["trunk"]], ctx.device, ctx.seed,
                                        None if colours is None else [colours[:n], *extracted["colour"]])
    base = FinetuneConfig(epochs=ctx.epochs or FinetuneConfig.epochs, batch_size=ctx.batch_size,
                          augment=ctx.augment, views=ctx.aug_views, loss=ctx.loss.kind, seed=ctx.seed)
    lrs = finetune_lrs(ctx.family, ctx.lr, ctx.trials)
    trial_epochs = 1 if len(lrs) > 1 else base.epochs
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    resume_root = ctx.run_dir / "resume"

    def train(k: int, cfg: FinetuneConfig, name: str, tag: dict) -> dict:
        """Learning rate k under ``cfg`` from the start, resuming its own checkpoint ``resume/<name>``."""
        model.load_state_dict(start)
        return finetune(model, train_src, ctx.y_train, val_src, ctx.y_val, replace(cfg, lr=lrs[k]), resume_root / name,
                        ctx.loss, resume=True, log=lambda rec: ctx.log({**tag, "lr": lrs[k], **rec}),
                        progress=ctx.progress)

    # a trial is the whole schedule (warm-up, cosine to zero) compressed into its epochs: scored at the end of a
    # prefix of the long schedule instead, trials still near their peak rate rank below lower rates (README)
    trial_cfg = replace(base, epochs=trial_epochs, warmup_epochs=base.warmup_epochs * trial_epochs / base.epochs)
    # each trial's result is kept, so a resumed sweep chooses as an uninterrupted one did
    record = resume_root / "trials.json"
    sweep: dict[str, dict] = read_json(record) if record.exists() else {}
    for k in range(len(lrs) if len(lrs) > 1 else 0):
        if str(k) not in sweep:
            try:
                sweep[str(k)] = train(k, trial_cfg, f"trial-{k}", {"trial": k})
            except TrainingDiverged as e:  # a learning rate too high for this backbone: the others still count
                sweep[str(k)] = {"best_val_map": None, "epochs": 0, "seconds": 0.0, "diverged": str(e)}
            if world().main:
                write_json(record, sweep)
    scored = {int(k): s["best_val_map"] for k, s in sweep.items() if s["best_val_map"] is not None}
    if sweep and not scored:
        raise TrainingDiverged(f"{ctx.run_dir}: every fine-tune trial diverged (learning rates {lrs}); lower --lr")
    best = max(scored, key=scored.get) if scored else 0
    result = train(best, base, "final", {"run": "final"})
    if not world().main:  # rank 0 has the same weights (DDP): it alone goes on (cRT, the run's files)
        return Outcome({}, 0, timing, reused)
    for k in range(len(lrs)):  # the trials' checkpoints are no longer needed
        shutil.rmtree(resume_root / f"trial-{k}", ignore_errors=True)
    timing["block_training"] = sum(s["seconds"] for s in sweep.values()) + result["seconds"]
    searched = "block learning rate"
    crt = None
    if ctx.rebalance == "crt":  # cRT: the fine-tuned representation fixed, the head trained anew on the re-sample
        t = time.perf_counter()
        plain = ImageSource(model, ctx.images, ctx.rows_train, ctx.preprocess) if ctx.augment else \
            TrunkSource(trunk[:n], ctx.device, train_side)
        x_train = tail_features(model, plain, len(ctx.rows_train))
        x_val = tail_features(model, val_src, len(ctx.rows_val))
        timing["crt_features"] = time.perf_counter() - t
        head, cfg, crt = fit_head(ctx, x_train, ctx.y_train, x_val)
        for rec in head.history:
            ctx.log({"crt": True, **rec})
        timing["crt_head"] = head.seconds
        crt |= {"probe": asdict(cfg), "sweep": head.sweep, "selected": head.best}
        searched += f" (then a cRT head over {len(cfg.weight_decays)} weight decays)"
    summary = {"finetune": asdict(replace(base, lr=lrs[best])), "result": result,
               "sweep": [{"lr": lrs[int(k)], "val_map": s["best_val_map"], "epochs": s["epochs"],
                          **({"diverged": s["diverged"]} if "diverged" in s else {})} for k, s in sorted(sweep.items())],
               "tuning": {"trials": len(lrs), "searched": searched, "grid": list(lrs), "trial_epochs": trial_epochs,
                          "trial_schedule": "the whole schedule compressed into the trial epochs; the selected "
                                            "learning rate then trains the full schedule from the start",
                          "selected_by": "validation macro mAP at the end of the trial"},
               "init_head": ctx.init_head[2] if ctx.init_head else "zero weights, bias at the training frequencies"}
    if ctx.aug_views:
        summary["aug_views"] = {"views": ctx.aug_views, "recipe": RECIPE,
                                "caches": [vs.key for vs in view_stores(ctx, "trunk")],
                                "drawn": "each epoch, one of the original and its views per training image"}
    if crt:
        summary["crt"] = crt
    return Outcome(summary, sum(p.numel() for p in model.parameters() if p.requires_grad), timing, reused)


STRATEGIES: dict[str, Callable[[Context], Outcome]] = {"probe": run_probe, "ft": run_finetune}
