"""Strategy 2: fine-tune the last 4 blocks (+ final norm) and the head; everything before them is frozen.

The trainable part sees batches of *trunk activations* (the stem's output). They come either from the
frozen-trunk cache (the stem's output is the same every epoch, so this is exact up to the cache dtype), from the
trunk caches of K augmented views of each training image besides it (``--aug-views``: each epoch draws one of the
K + 1 for each image, :class:`ViewTrunkSource`), or from images run through the stem under no-grad (``--augment``). AdamW, cosine schedule
with linear warm-up, bf16 autocast (on CPU the depthwise convolutions stay fp32: :func:`fp32_depthwise`), early
stopping on validation mAP; every epoch writes a resume checkpoint
(safetensors + JSON, no pickle) atomically.

Under torchrun (:mod:`bakeoff.common.distributed`) the trainable part runs in DistributedDataParallel: each rank
takes a contiguous slice of every global batch (``batch_size`` stays the global batch, so the schedule, the
number of steps and, up to float rounding, the gradients are those of one process), validation is sharded and
gathered, and rank 0 alone writes the checkpoints and the history.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bakeoff.common.device import autocast
from bakeoff.common.distributed import World, world
from bakeoff.common.io import atomic_path, read_json, write_json
from bakeoff.train.heads import tag_scores
from bakeoff.train.losses import MultiLabelLoss
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.registry import TaggingModel
from bakeoff.train.valmetrics import macro_ap


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


@dataclass
class FinetuneConfig:
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-4  # last 4 blocks
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    patience: int = 3
    augment: bool = False
    views: int = 0  # cached augmented views per training image besides the original (ViewTrunkSource)
    loss: str = "bce"
    amp: bool = True
    seed: int = 0


# what a source gives the trainable part for a batch: trunk activations, and the model's side input (or None)
Inputs = tuple[torch.Tensor, "torch.Tensor | None"]


def _rows(array: np.ndarray, pos: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array[pos]`` as float32 on ``device``, read in row order (a store reads sorted rows fastest)."""
    return torch.from_numpy(np.asarray(array[np.sort(pos)], dtype=np.float32)[np.argsort(np.argsort(pos))]).to(device)


class TrunkSource:
    """Batches of cached trunk activations (rows of a FeatureStore's ``trunk``), with the cached side input of the
    same rows (a store's ``colour``) when the model has one."""

    def __init__(self, trunk: np.ndarray, device: torch.device, side: np.ndarray | None = None):
        self.trunk, self.device, self.side = trunk, device, side

    def __call__(self, pos: np.ndarray) -> Inputs:
        return _rows(self.trunk, pos, self.device), None if self.side is None else _rows(self.side, pos, self.device)


class ViewTrunkSource:
    """Cached trunk activations of each training image's original and K augmented views (``trunks[0]`` the
    originals, ``trunks[k]`` view k, row-aligned; ``sides``, where given, the side inputs of the same views):
    :meth:`set_epoch` draws, for every image, which of the K + 1 it shows this epoch (seeded by (seed, epoch), as
    ``DistributedSampler.set_epoch`` seeds its shuffle, so every rank and a resumed run draw the same)."""

    def __init__(self, trunks: Sequence[np.ndarray], device: torch.device, seed: int = 0,
                 sides: Sequence[np.ndarray] | None = None):
        if len({len(t) for t in [*trunks, *(sides or [])]}) != 1 or (sides and len(sides) != len(trunks)):
            raise ValueError(f"view trunks (and side inputs) must have the same rows, one per view: got trunks of "
                             f"{[len(t) for t in trunks]} rows, side inputs of {[len(s) for s in sides or []]}")
        self.sources = [TrunkSource(t, device, sides[k] if sides else None) for k, t in enumerate(trunks)]
        self.seed = seed
        self.choice = np.zeros(len(trunks[0]), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.choice = np.random.default_rng([self.seed, epoch, 1]).integers(0, len(self.sources), len(self.choice))

    def __call__(self, pos: np.ndarray) -> Inputs:
        pos = np.asarray(pos, dtype=np.int64)
        view = self.choice[pos]
        empty = [t for t in self.sources[0](pos[:0]) if t is not None]  # a batch's shapes, device and dtype
        out = [t.new_empty((len(pos), *t.shape[1:])) for t in empty]
        for k in np.unique(view):
            at = np.flatnonzero(view == k)
            for o, got in zip(out, self.sources[k](pos[at])):
                o[torch.from_numpy(at).to(o.device)] = got
        return out[0], out[1] if len(out) > 1 else None


class ImageSource:
    """Batches of trunk activations (and the model's side input) computed from cached images (optionally
    augmented) under no-grad."""

    def __init__(self, model: TaggingModel, images: np.ndarray, rows: np.ndarray, preprocess: Preprocess,
                 augment: bool = False, amp: bool = True, seed: int = 0):
        self.model, self.images, self.rows, self.preprocess = model, images, rows, preprocess
        self.augment, self.amp = augment, amp
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, pos: np.ndarray) -> Inputs:
        x = self.preprocess(self.images[self.rows[pos]])
        if self.augment:
            x = light_augment(x, self.gen)
        with autocast(self.preprocess.device, self.amp):
            return self.model.backbone.stem(x).float(), self.model.side(x)


def light_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a small random translation (pad 1/16 with edge pixels, crop back)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, x.shape[-1] // 16)
    xp = nn.functional.pad(x, (pad,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def trainable_parameters(model: TaggingModel) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the last 4 blocks (+ final norm) and the head."""
    model.requires_grad_(False)
    params = []
    for m in [*model.backbone.tuned_modules(), model.head]:
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    return list({id(p): p for p in params}.values())


def set_train_mode(model: TaggingModel) -> None:
    """Tuned blocks and head in train mode (dropout, drop-path); everything else, and every BatchNorm, in eval.

    BatchNorm keeps its pretrained statistics (its affine weights still train): batch statistics over the
    last stages' 2x2..4x4 maps of a 64-image batch are noisy, and the probe's head was fitted on features
    computed with the running statistics, so LP-then-FT starts exactly where the probe ended.
    """
    model.eval()
    for m in [*model.backbone.tuned_modules(), model.head]:
        m.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def make_optimizer(model: TaggingModel, cfg: FinetuneConfig) -> torch.optim.AdamW:
    params = trainable_parameters(model)
    head_ids = {id(p) for p in model.head.parameters()}
    groups: dict[str, list] = {"blocks_decay": [], "blocks_no_decay": [], "head": []}
    for p in params:
        if id(p) in head_ids:
            groups["head"].append(p)
        else:
            groups["blocks_decay" if p.dim() >= 2 else "blocks_no_decay"].append(p)
    return torch.optim.AdamW([
        {"params": groups["blocks_decay"], "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": groups["blocks_no_decay"], "lr": cfg.lr, "weight_decay": 0.0, "base_lr": cfg.lr},
        {"params": groups["head"], "lr": cfg.head_lr, "weight_decay": 1e-4, "base_lr": cfg.head_lr},
    ])


def lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class TunedPart(nn.Module):
    """What a fine-tune trains, as one module: trunk activations (+ side input) -> logits through the tuned blocks
    and the head (the module DistributedDataParallel wraps)."""

    def __init__(self, model: TaggingModel):
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.from_trunk(h, side)


def _fp32_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return type(conv).forward(conv, x.float())


@contextlib.contextmanager
def fp32_depthwise(modules: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """On CPU, run the depthwise convolutions of ``modules`` in fp32 under bf16 autocast for the ``with`` block.

    oneDNN's bf16 backward of a depthwise convolution is its slow path: 64 x 1152 x 7 x 7, 5x5, 2 threads, forward +
    backward 58 ms in bf16 vs 17 ms in fp32 (channels-last both), and in EfficientNet-Lite0's last 4 blocks those
    backwards were 56% of a fine-tune step (``bench/train_bench.py``). Depthwise convolutions are a sliver of the
    FLOPs, so fp32 costs nothing elsewhere, and it is more precise. Nothing changes on GPU, or in the weights.
    """
    convs = [m for mod in modules for m in mod.modules()
             if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels] if device.type == "cpu" else []
    for conv in convs:
        conv.forward = functools.partial(_fp32_forward, conv)  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


def batch_loss(net: nn.Module, inputs: Inputs, y: torch.Tensor, loss_fn: nn.Module, amp: bool) -> torch.Tensor:
    """Loss of the trainable part ``net`` (a :class:`TunedPart`, maybe in DDP) on a source's ``inputs``: the same
    code for cached and uncached paths."""
    with autocast(inputs[0].device, amp):
        logits = net(*inputs)
    return loss_fn(logits.float(), y)


def distributed(net: TunedPart, w: World) -> nn.Module:
    """``net`` in DistributedDataParallel when several ranks train (its construction broadcasts rank 0's weights
    and buffers; BatchNorm stays in eval mode, :func:`set_train_mode`, so its statistics never drift apart)."""
    if not w.distributed:
        return net
    device = next(p for p in net.parameters() if p.requires_grad).device
    return DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


@torch.no_grad()
def predict_from_trunk(model: TaggingModel, source: Callable[[np.ndarray], Inputs], n: int,
                       batch_size: int = 256, amp: bool = True, groups: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """Ranking scores for positions 0..n-1 of ``source``: softmax within ``groups``, sigmoid elsewhere. Under
    torchrun each rank scores its part and every rank gets all of them, in order."""
    model.eval()
    w = world()
    lo, hi = w.part(n)
    out = []
    for o in range(lo, hi, batch_size):
        h, side = source(np.arange(o, min(hi, o + batch_size)))
        with autocast(h.device, amp):
            out.append(tag_scores(model.from_trunk(h, side), groups).cpu().numpy())
    return w.gather(np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32))


# ---- resume checkpoints (safetensors for tensors, JSON for the rest; never pickle) ----------------------

def _trainable_state(model: TaggingModel) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p.detach().clone().contiguous() for p in trainable_parameters(model)}


def save_resume(path: Path, model: TaggingModel, opt: torch.optim.Optimizer, state: dict,
                best: dict[str, torch.Tensor]) -> None:
    """Trainable weights, AdamW moments and the best weights so far in one safetensors file, plus JSON."""
    tensors = {f"model.{k}": v for k, v in _trainable_state(model).items()}
    tensors |= {f"best.{k}": v.contiguous() for k, v in best.items()}
    names = {id(p): n for n, p in model.named_parameters()}
    steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"opt.{n}.exp_avg"] = st["exp_avg"].contiguous()
                tensors[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                steps[n] = float(st["step"])
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "resume.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(path / "resume.json", {**state, "opt_steps": steps})


def load_resume(path: Path, model: TaggingModel, opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore what ``save_resume`` wrote; returns (state, best weights).

    The file is read to CPU; the weights are copied into the parameters (any device and dtype) and the AdamW
    moments go through ``Optimizer.load_state_dict``, which casts and moves each parameter's state to that
    parameter's device and dtype (and keeps ``step`` as the optimizer wants it), as resuming on a GPU needs.
    """
    tensors = load_file(str(path / "resume.safetensors"))
    state = read_json(path / "resume.json")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("model."):
                params[k[6:]].copy_(v)
    steps = state.pop("opt_steps")
    names = {id(p): n for n, p in params.items()}
    saved = opt.state_dict()  # param_groups (hyper-parameters, and parameter indices in optimizer order)
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    unknown = sorted(set(steps) - set(order))
    if unknown:
        raise ValueError(f"{path}/resume.json: optimizer state for parameters this fine-tune does not train: "
                         f"{unknown[:3]}; rerun without --resume to start over")
    saved["state"] = {i: {"step": torch.tensor(steps[n], dtype=torch.float32), "exp_avg": tensors[f"opt.{n}.exp_avg"],
                          "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"]}
                      for i, n in enumerate(order) if n in steps}
    opt.load_state_dict(saved)
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    return state, best


def finetune(model: TaggingModel, train_source: Callable[[np.ndarray], Inputs], y_train: np.ndarray,
             val_source: Callable[[np.ndarray], Inputs], y_val: np.ndarray, cfg: FinetuneConfig,
             resume_dir: Path, loss_fn: nn.Module | None = None, resume: bool = False,
             log: Callable[[dict], None] = lambda rec: None, progress: bool = True,
             stop_after_epochs: int | None = None) -> dict:
    """Train the last 4 blocks + head; leaves the best-validation weights in ``model``; returns a summary.

    ``stop_after_epochs`` stops early (as an interrupt would) after that many epochs of this call.
    """
    device = next(model.head.parameters()).device
    w = world()
    loss_fn = (loss_fn or MultiLabelLoss(cfg.loss)).to(device)
    opt = make_optimizer(model, cfg)
    n = len(y_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    state = {"epoch": 0, "step": 0, "best_map": -1.0, "best_epoch": 0, "bad_epochs": 0, "seconds": 0.0,
             "config": asdict(cfg)}
    best = _trainable_state(model)
    if resume and (resume_dir / "resume.json").exists():
        state, best = load_resume(resume_dir, model, opt)
        state["config"] = asdict(FinetuneConfig()) | state["config"]  # fields added since: their defaults then
        if state["config"] != asdict(cfg):
            raise ValueError(f"{resume_dir}/resume.json: saved fine-tune config {state['config']} differs from "
                             f"this one {asdict(cfg)}; rerun without --resume to start over")
    net = distributed(TunedPart(model), w)
    y_train_t = torch.as_tensor(y_train, dtype=torch.float32)
    epochs_run = 0
    with fp32_depthwise(model.backbone.tuned_modules(), device):
        while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                break
            t0 = time.perf_counter()
            epoch = state["epoch"] + 1
            rng = np.random.default_rng([cfg.seed, epoch])
            perm = rng.permutation(n)
            if hasattr(train_source, "set_epoch"):  # a source that changes with the epoch (ViewTrunkSource)
                train_source.set_epoch(epoch)
            set_train_mode(model)
            losses = []
            bar = tqdm(range(steps_per_epoch), desc=f"fine-tune epoch {epoch}/{cfg.epochs}", leave=False,
                       disable=not progress or not w.main)
            for k in bar:
                batch = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
                lo, hi = w.part(len(batch))
                pos = batch[lo:hi]
                inputs = train_source(pos)
                # DDP averages the ranks' gradients: weighting each rank's mean by its share of the batch makes the
                # average the gradient of the whole batch's mean loss, also when the slices differ in size (a rank
                # whose slice is empty still joins the step, with a zero loss)
                share = len(pos) * w.size / len(batch)
                loss = batch_loss(net, inputs, y_train_t[pos].to(device), loss_fn, cfg.amp) * share \
                    if len(pos) else net(*inputs).sum() * 0.0
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"fine-tune: loss is {loss.item()} at epoch {epoch}, step {k}; stopped. The last good "
                        f"checkpoint (epoch {state['epoch']}) is kept in {resume_dir}; lower --lr and rerun.")
                scale = lr_scale(state["step"], total, warmup)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state["step"] += 1
                losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            train_loss = w.mean(float(np.mean(losses)))
            val_scores = predict_from_trunk(model, val_source, len(y_val), amp=cfg.amp,
                                            groups=getattr(loss_fn, "groups", ()))
            val_map = macro_ap(y_val, val_scores)
            state["epoch"] = epoch
            state["seconds"] += time.perf_counter() - t0
            if val_map > state["best_map"]:
                state.update(best_map=val_map, best_epoch=epoch, bad_epochs=0)
                best = _trainable_state(model)
            else:
                state["bad_epochs"] += 1
            rec = {"epoch": epoch, "train_loss": train_loss, "val_map": val_map,
                   "lr": opt.param_groups[0]["lr"], "seconds": state["seconds"]}
            if w.main:
                log(rec)
                save_resume(resume_dir, model, opt, state, best)
            epochs_run += 1
    w.barrier()  # rank 0's last checkpoint is on disk before any rank reads it (a later trial, a resume)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in best.items():
            params[k].copy_(v)
    return {"best_epoch": state["best_epoch"], "best_val_map": state["best_map"], "epochs": state["epoch"],
            "seconds": state["seconds"], "stopped_early": state["bad_epochs"] >= cfg.patience,
            "finished": state["epoch"] >= cfg.epochs or state["bad_epochs"] >= cfg.patience}
