"""Training-pipeline benchmark (prints figures; not a test).

1. Feature extraction: images/s of the pipeline (`train.features.extract`: image cache -> preprocess -> stem
   -> tail -> float16 store) vs a bare timm/open_clip forward loop over pre-made input tensors, same model,
   batch and dtype. Target: pipeline overhead under 10%.
2. Fine-tune epoch time with and without the frozen-trunk cache, against the FLOP bound
   (forward of all blocks + backward of the last 4 vs forward + backward of the last 4 only).

    python -m bench.train_bench --data data/fashion --family dinov2 --image-size 112 --images 2048
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bakeoff.common.device import autocast, device_name, pick_device, setup_threads
from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.features import FeatureStore, extract
from bakeoff.train.finetune import (
    FinetuneConfig,
    ImageSource,
    TrunkSource,
    TunedPart,
    batch_loss,
    fp32_depthwise,
    make_optimizer,
    set_train_mode,
)
from bakeoff.train.losses import MultiLabelLoss
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.registry import TaggingModel, get_spec
from bakeoff.train.weights import create_backbone


def flops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def epoch_seconds(model, source, y, n, batch_size, amp, fp32_dw: bool = True) -> tuple[float, dict[str, float]]:
    """One fine-tune epoch over ``n`` images (depthwise convolutions in fp32 on CPU unless ``fp32_dw`` is False,
    as :func:`finetune` runs them): its seconds, and how they split over the phases of a step."""
    cfg = FinetuneConfig(batch_size=batch_size)
    opt = make_optimizer(model, cfg)
    loss_fn = MultiLabelLoss("bce")
    set_train_mode(model)
    device = next(model.parameters()).device
    phases = dict.fromkeys(("batch", "forward + loss", "backward", "AdamW step"), 0.0)
    t0 = last = time.perf_counter()

    def tick(phase: str) -> None:
        nonlocal last
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        phases[phase] += now - last
        last = now

    with fp32_depthwise(model.backbone.tuned_modules(), device) if fp32_dw else contextlib.nullcontext():
        for o in range(0, n, batch_size):
            pos = np.arange(o, min(n, o + batch_size))
            inputs, yb = source(pos), torch.as_tensor(y[pos], dtype=torch.float32, device=device)
            tick("batch")
            loss = batch_loss(TunedPart(model), inputs, yb, loss_fn, amp)
            tick("forward + loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            tick("backward")
            opt.step()
            tick("AdamW step")
    return time.perf_counter() - t0, phases


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--family", default="dinov2")
    p.add_argument("--model")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--cache-size", type=int, default=128)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    setup_threads()
    device = pick_device(a.device)
    spec = get_spec(a.family, a.model, a.image_size)
    ds = load_dataset(a.data)
    images = load_cache(ds, a.cache_size)
    rows = ds.split_indices("train")[: a.images]
    y = ds.labels()[rows]
    backbone, info = create_backbone(spec, "random")
    model = TaggingModel(backbone, len(ds.taxonomy)).to(device)
    prep = Preprocess(spec.img_size, spec.mean, spec.std, device)
    print(f"device: {device_name(device)}; model {spec.name} @ {spec.img_size}px, batch {a.batch_size}, bf16 autocast, "
          f"{len(rows)} images (random init: speed only)")

    # 1. extraction: pipeline vs bare forward over ready tensors
    xs = [prep(images[rows[o:o + a.batch_size]]) for o in range(0, len(rows), a.batch_size)]
    backbone.eval()
    with torch.no_grad(), autocast(device):
        backbone(xs[0])
        t = time.perf_counter()
        for x in xs:
            backbone(x)
        bare = len(rows) / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        extract(backbone, prep, images, rows[: a.batch_size], FeatureStore(Path(tmp), "warm"), progress=False)
        t = time.perf_counter()
        extract(backbone, prep, images, rows, FeatureStore(Path(tmp), "f"), ("features",), batch_size=a.batch_size,
                progress=False)
        pipe = len(rows) / (time.perf_counter() - t)
        print(f"extraction: pipeline {pipe:.1f} img/s vs bare forward {bare:.1f} img/s -> overhead "
              f"{100 * (bare / pipe - 1):.1f}%")

        # 2. fine-tune epoch with and without the trunk cache
        trunk = extract(backbone, prep, images, rows, FeatureStore(Path(tmp), "t"), ("trunk",),
                        batch_size=a.batch_size, progress=False)["trunk"]
        cached, cached_phases = epoch_seconds(model, TrunkSource(trunk, device), y, len(rows), a.batch_size, True)
        bf16_dw, _ = epoch_seconds(model, TrunkSource(trunk, device), y, len(rows), a.batch_size, True, fp32_dw=False)
        uncached, uncached_phases = epoch_seconds(model, ImageSource(model, images, rows, prep), y, len(rows),
                                                  a.batch_size, True)
    x1 = xs[0][:1]
    f_stem = flops(lambda: backbone.stem(x1))
    h1 = backbone.stem(x1).detach()

    def tail_fb():
        model.head(backbone.tail(h1)).sum().backward()

    f_tail = flops(tail_fb)
    bound = (f_stem + f_tail) / f_tail
    print(f"fine-tune epoch: uncached {uncached:.1f} s, cached {cached:.1f} s -> speed-up {uncached / cached:.2f}x; "
          f"FLOP bound (stem fwd + tail fwd/bwd) / (tail fwd/bwd) = {bound:.2f}x -> "
          f"{100 * (uncached / cached) / bound:.0f}% of bound")
    if device.type == "cpu":
        print(f"cached epoch with the depthwise convolutions in bf16 {bf16_dw:.1f} s, in fp32 (as fine-tunes run "
              f"them on CPU) {cached:.1f} s")
    for name, phases in (("cached", cached_phases), ("uncached", uncached_phases)):
        total = sum(phases.values())
        print(f"where a {name} epoch's time goes: " + ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)"
                                                                 for k, v in phases.items()))


if __name__ == "__main__":
    main()
