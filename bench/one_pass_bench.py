"""The grid's one pass per backbone: the probe's features and the fine-tune's frozen trunk in two passes over the
images (each strategy its own, as before) vs one joint pass (:func:`bakeoff.train.features.extract_all`).

    python -m bench.one_pass_bench                                   # MobileNetV2 at 112 px, 512 synthetic images
    python -m bench.one_pass_bench --model resnet50 --image-size 160 --images 256 --repeat 3

Random init and random uint8 images (speed only). Prints the device (CPU model, threads), the seconds of each
way per repeat and their medians, and the saving of one pass over two.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bakeoff.common.device import device_name
from bakeoff.train.features import FeatureStore, Target, extract_all
from bench.random_inputs import random_inputs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv2_100", help="a cnn registry name or timm model")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    r = random_inputs(a.model, a.image_size, a.images, a.device)
    print(f"device: {device_name(r.device)}; {r.spec.name} @ {r.spec.img_size}px, batch {a.batch_size}, bf16 autocast, "
          f"{a.images} synthetic images, trunk and features float16")

    def seconds(passes: list[list[str]], root: Path) -> float:
        """Wall time of ``passes``, each one pass filling a new store per output it names."""
        t = time.perf_counter()
        for outputs in passes:
            extract_all(r.backbone, r.preprocess, r.images, r.rows, [Target(FeatureStore(root, f"{o}-{time.perf_counter_ns()}"),
                                                              (o,)) for o in outputs],
                        batch_size=a.batch_size, progress=False)
        return time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        seconds([["features", "trunk"]], Path(tmp))  # warm-up
        two, one = [], []
        for _ in range(a.repeat):
            two.append(seconds([["features"], ["trunk"]], Path(tmp)))
            one.append(seconds([["features", "trunk"]], Path(tmp)))
    for k, (t2, t1) in enumerate(zip(two, one)):
        print(f"repeat {k}: two passes {t2:.2f} s, one pass {t1:.2f} s")
    t2, t1 = statistics.median(two), statistics.median(one)
    print(f"median: two passes {t2:.2f} s ({a.images / t2:.0f} img/s), one pass {t1:.2f} s ({a.images / t1:.0f} img/s)"
          f" -> saves {t2 - t1:.2f} s per backbone ({100 * (1 - t1 / t2):.0f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
