"""Does the default image cache keep the fine detail a model's input can see? (issue "a real user's run")

A synthetic catalog of 400x400 images whose tags depend on fine detail (``train.data.synth`` with ``detail`` 8:
brand-glyph cells ~2 px, size-sticker pips, pattern and material textures drawn 8x finer), then the same linear
probe (EfficientNet-Lite0 at 224 px) trained and scored on the test split once per image cache:

- ``default``: what ``python -m train --image-size 224`` picks with --cache-size unset
  (``train.profiles.resolve``: the largest input size of the grid);
- ``input``: a cache at the input size, given explicitly;
- ``old default``: 128 px, the cache size every run used before, whatever its input.

Done when ``default`` scores within 0.01 macro-F1 of ``input``. Macro-F1 is also split into the fine-detail
fields (brand, size, pattern, material) and the coarse ones (category, colour, packaging, style).

    python bench/cache_size_check.py [--images 1500] [--weights-dir ../shared/weights] [--out /tmp/cache-check]
"""
from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from bakeoff.common.device import device_name, pick_device
from bakeoff.evaluate.score import evaluate_run
from bakeoff.train.data.dataset import field_of, load_dataset
from bakeoff.train.data.splits import prepare
from bakeoff.train.data.synth import generate
from bakeoff.train.profiles import FAMILIES, Settings, resolve
from bakeoff.train.run import RunOptions, train_pair

FINE = {"brand", "size", "pattern", "material"}
MODEL = "efficientnet_lite0"


def field_f1(per_tag: Path, fields: set[str]) -> float:
    """Mean F1 over the scored tags (per_tag.csv) of ``fields``."""
    with open(per_tag, newline="", encoding="utf-8") as f:
        f1 = [float(t["f1"]) for t in csv.DictReader(f) if t["f1"] and field_of(t["name"]) in fields]
    return float(np.mean(f1)) if f1 else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/cache-check"))
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--tags", type=int, default=30)
    p.add_argument("--source-size", type=int, default=400, help="synthetic image side (px)")
    p.add_argument("--detail", type=float, default=8.0, help="how many times finer the fine marks are drawn")
    p.add_argument("--image-size", type=int, default=224, help="the model's input (px)")
    p.add_argument("--old-cache", type=int, default=128)
    p.add_argument("--weights", default="auto", help="auto | pretrained | random")
    p.add_argument("--weights-dir", default=os.environ.get("BAKEOFF_WEIGHTS", "../shared/weights"))
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    data = a.out / "data"
    if not (data / "splits.json").exists():
        generate(data, n_images=a.images, n_tags=a.tags, image_size=a.source_size, detail=a.detail)
        prepare(data, test_size=0.2, val_fraction=0.2, seed=0)
    ds = load_dataset(data)
    print(f"catalog: {len(ds)} images at {a.source_size} px (detail {a.detail:g}), {len(ds.taxonomy)} tags, "
          f"{time.perf_counter() - t0:.0f} s")
    default = resolve(Settings(model={"cnn": MODEL}, image_size=dict.fromkeys(FAMILIES, a.image_size))).cache_size
    coarse = {field_of(t) for t in ds.taxonomy} - FINE
    caches = {"default": default, "input": a.image_size, "old default": a.old_cache}
    rows = []
    for name, cache in caches.items():
        t = time.perf_counter()
        opts = RunOptions(family="cnn", strategy="probe", model=MODEL, weights=a.weights, weights_dir=a.weights_dir,
                          image_size=a.image_size, cache_size=cache, progress=False)
        run_dir = train_pair(data, a.out / f"runs-{name.replace(' ', '-')}", opts)
        m = evaluate_run(run_dir, ds, "torch")
        per_tag = run_dir / "eval" / "torch" / "per_tag.csv"
        rows.append((name, cache, m["macro_f1"], field_f1(per_tag, FINE), field_f1(per_tag, coarse),
                     m["weights"]["kind"], time.perf_counter() - t))
    print(f"\nEfficientNet-Lite0 linear probe at {a.image_size} px, test split ({len(ds.split_indices('test'))} "
          f"images), {device_name(pick_device('auto'))}, {time.perf_counter() - t0:.0f} s in all\n")
    print("| image cache | px | macro-F1 | fine-detail fields | coarse fields | weights | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, cache, f1, fine, coarse, kind, s in rows:
        print(f"| {name} | {cache} | {f1:.4f} | {fine:.4f} | {coarse:.4f} | {kind} | {s:.0f} |")
    delta = rows[0][2] - rows[1][2]
    print(f"\ndefault - input: {delta:+.4f} macro-F1 ({'within' if abs(delta) <= 0.01 else 'OUTSIDE'} ±0.01); "
          f"old default - input: {rows[2][2] - rows[1][2]:+.4f}")
    return 0 if abs(delta) <= 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
