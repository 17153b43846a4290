"""python -m train --backbone clip --strategy ft --data DATASET --out RUNS   (or --all for the 3x2 grid)
python -m train --all --plan-weights [--weights auto] [--weights-dir DIR]   (where the weights would come from)"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from train.probe import ProbeConfig
from train.registry import FAMILIES, REGISTRY, get_spec
from train.run import STRATEGIES, RunError, RunOptions, is_complete, pair_name, train_pair
from train.weights import WeightsNotFound, plan_weights


def per_family(values: list[str] | None, flag: str) -> dict[str, str]:
    """``["cnn=efficientnet_lite0", "random"]`` -> {"cnn": "efficientnet_lite0", "dinov2": "random", ...}."""
    out: dict[str, str] = {}
    default = None
    for v in values or []:
        fam, sep, val = v.partition("=")
        if sep and fam in FAMILIES:
            out[fam] = val
        elif sep and fam not in FAMILIES and not val.startswith("/"):
            raise SystemExit(f"{flag} {v}: unknown family {fam!r}; families: {', '.join(FAMILIES)}")
        else:
            default = v
    return {f: out.get(f, default) for f in FAMILIES if out.get(f, default) is not None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", choices=FAMILIES, help="backbone family")
    p.add_argument("--strategy", choices=STRATEGIES, help="probe = linear probe on frozen features; ft = last 4 blocks")
    p.add_argument("--all", action="store_true", help="run the whole 3x2 grid, skipping finished pairs")
    p.add_argument("--data", help="dataset directory (python -m train.data ...); required unless --plan-weights")
    p.add_argument("--plan-weights", action="store_true",
                   help="print where each family's weights would come from (file / hub / random init) and exit")
    p.add_argument("--out", default="runs", help="runs directory")
    p.add_argument("--model", action="append", help=f"registry variant; with --all also FAMILY=NAME. Known: {', '.join(REGISTRY)}")
    p.add_argument("--weights", action="append", help="pretrained | random | FILE; with --all also FAMILY=VALUE")
    p.add_argument("--weights-dir", help="local timm/open_clip weight files (<arch>.<tag>.safetensors); env BAKEOFF_WEIGHTS")
    p.add_argument("--image-size", action="append", help="model input size (px); with --all also FAMILY=PX")
    p.add_argument("--cache-size", type=int, default=128, help="image cache resolution (px)")
    p.add_argument("--max-train-images", type=int, help="stratified subset of train (val/test untouched)")
    p.add_argument("--loss", choices=("bce", "balanced", "asl"), default="bce")
    p.add_argument("--epochs", type=int, help="fine-tune epochs (default 5; early stopping on val mAP)")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, help="fine-tune learning rate for the last 4 blocks (per-family default)")
    p.add_argument("--augment", action="store_true", help="light augmentation (disables the frozen-trunk cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.all == bool(args.backbone or args.strategy):
        raise SystemExit("give either --backbone and --strategy, or --all")
    if not args.all and not (args.backbone and args.strategy):
        raise SystemExit("--backbone and --strategy go together")
    families = FAMILIES if args.all else (args.backbone,)
    strategies = STRATEGIES if args.all else (args.strategy,)
    models = per_family(args.model, "--model")
    weights = per_family(args.weights, "--weights")
    if args.plan_weights:
        for fam in families:
            spec = get_spec(fam, models.get(fam))
            print(plan_weights(spec, weights.get(fam, "pretrained"), args.weights_dir).describe(spec))
        return 0
    if not args.data:
        raise SystemExit("--data is required (the dataset directory)")
    sizes = per_family(args.image_size, "--image-size")
    failures = []
    for fam in families:
        for strat in strategies:  # probe first: fine-tune starts from the probe's head (LP-then-FT)
            name = pair_name(fam, strat)
            run_dir = Path(args.out) / name
            if args.all and is_complete(run_dir):
                print(f"{name}: already complete, skipped ({run_dir})")
                continue
            opts = RunOptions(family=fam, strategy=strat, model=models.get(fam), weights=weights.get(fam, "pretrained"),
                              weights_dir=args.weights_dir, image_size=int(sizes[fam]) if fam in sizes else None,
                              cache_size=args.cache_size, max_train_images=args.max_train_images, loss=args.loss,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=args.augment,
                              seed=args.seed, device=args.device, resume=args.resume or args.all,
                              progress=not args.no_progress,
                              probe=ProbeConfig(**({"epochs": args.probe_epochs} if args.probe_epochs else {})))
            t = time.perf_counter()
            try:
                out = train_pair(args.data, args.out, opts)
            except (WeightsNotFound, RunError, ValueError) as e:
                print(f"{name}: FAILED: {e}", file=sys.stderr)
                failures.append(name)
                continue
            print(f"{name}: done in {time.perf_counter() - t:.0f} s -> {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
