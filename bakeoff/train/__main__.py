"""python -m train --backbone clip --strategy ft --data DATASET --out RUNS   (or --all for the 3x2 grid)
python -m train --all --plan-weights [--profile P] [--weights auto] [--weights-dir DIR]   (profile, reductions, weights)

Options come from a profile (full by default: native input sizes, default schedules; cpu; demo), explicit flags
on top. After python -m reports.pipeline, ./bakeoff.json supplies --data, --out, the profile, its settings and the
weights (when the command names no other --data/--out). A complete run trained with the same options is current
and left alone; one trained with other options is retrained (--force retrains any). The image cache is, unless
--cache-size, the largest input size of the grid (all three families as set, whichever pairs this command
trains): one pair and --all share one cache, and no model sees an upsampled image.

torchrun --nproc-per-node N -m train ...   (or bakeoff.train; several machines: torchrun's --nnodes and rendezvous)
runs the same command as one job of N processes (bakeoff.common.distributed): rank 0 plans, logs and writes.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from bakeoff.common import distributed
from bakeoff.common.io import read_json
from bakeoff.common.log import add_verbosity_flags, setup_logging
from bakeoff.train.current import requested_weights, run_changes
from bakeoff.train.data.dataset import DatasetError, load_dataset
from bakeoff.train.finetune import TrainingDiverged
from bakeoff.train.losses import LOSSES
from bakeoff.train.probe import ProbeConfig
from bakeoff.train.profiles import (
    PROFILES,
    Profile,
    Settings,
    cache_warning,
    describe,
    per_family,
    reductions,
    resolve,
    settings_from_flags,
)
from bakeoff.train.project import PROJECT_FILE, Project, ProjectError, missing, project_for
from bakeoff.train.rebalance import REBALANCE
from bakeoff.train.registry import FAMILIES, REGISTRY, BackboneSpec, get_spec
from bakeoff.train.run import CONFIG, HEADS, STRATEGIES, RunError, RunOptions, is_complete, pair_name, train_pair
from bakeoff.train.weights import WeightsNotFound, plan_weights

log = logging.getLogger("bakeoff.train")  # not __name__: python -m train runs this module as __main__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", choices=FAMILIES, help="backbone family")
    p.add_argument("--strategy", choices=STRATEGIES, help="probe = linear probe on frozen features; ft = last 4 blocks")
    p.add_argument("--all", action="store_true", help="run the whole 3x2 grid, skipping current pairs")
    p.add_argument("--data", help=f"dataset directory (python -m train.data ...); default: ./{PROJECT_FILE}'s")
    p.add_argument("--plan-weights", action="store_true",
                   help="print the profile, its reductions and where each family's weights would come from, and exit")
    p.add_argument("--out", help=f"runs directory (default: ./{PROJECT_FILE}'s, else runs)")
    p.add_argument("--profile", choices=PROFILES,
                   help=f"named settings: {'; '.join(f'{n}: {q.summary}' for n, q in PROFILES.items())} "
                        f"(default: ./{PROJECT_FILE}'s, else full); the flags below override it")
    p.add_argument("--model", action="append",
                   help="registry name, or any timm model (ARCH, ARCH.TAG, hf-hub:ORG/REPO) or open_clip model "
                        f"(MODEL:TAG, hf-hub:ORG/REPO); with --all FAMILY=NAME. Registry: {', '.join(REGISTRY)}")
    p.add_argument("--weights", action="append", help="pretrained | random | auto | FILE; with --all also FAMILY=VALUE "
                                                      "(default: pretrained)")
    p.add_argument("--weights-dir", help="local timm/open_clip weight files (<arch>.<tag>.safetensors); env BAKEOFF_WEIGHTS")
    p.add_argument("--image-size", action="append", help="model input size (px); with --all also FAMILY=PX "
                                                         "(default: the model's native size)")
    p.add_argument("--cache-size", type=int, help="image cache resolution (px) (default: the largest input size of "
                                                  "the grid, so no model sees an upsampled image)")
    p.add_argument("--max-train-images", type=int, help="stratified subset of train (val/test untouched)")
    p.add_argument("--loss", choices=LOSSES, default="bce",
                   help="per-tag loss for tags outside single-valued fields (balanced: class-balanced BCE; asl: "
                        "asymmetric loss)")
    p.add_argument("--head", choices=HEADS, default="field",
                   help="field: a softmax over each single-valued field's tags (found in the training split), "
                        "decided by arg-max, sigmoid elsewhere; sigmoid: one sigmoid per tag")
    p.add_argument("--logit-adjust", type=float, metavar="TAU",
                   help="logit adjustment tau for the softmax fields (default: selected on validation)")
    p.add_argument("--threshold-shrink", type=float, metavar="K",
                   help="shrink each sigmoid tag's threshold towards its bucket's with strength K (default: "
                        "selected by cross-fitting on validation; 0 = per-tag thresholds)")
    p.add_argument("--trials", type=int, default=RunOptions.trials,
                   help="hyper-parameter trials per pair, the same for every pair (probe: weight decays; "
                        "fine-tune: block learning rates)")
    p.add_argument("--epochs", type=int, help="fine-tune epochs (default 5; early stopping on val mAP)")
    p.add_argument("--probe-epochs", type=int, help=f"linear-probe epochs (default {ProbeConfig.epochs})")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (extraction and fine-tune)")
    p.add_argument("--lr", type=float, help="fine-tune learning rate for the last 4 blocks (per-family default)")
    p.add_argument("--augment", action="store_true",
                   help="fine-tune only: light augmentation, flip + shift, computed every step (disables the "
                        "frozen-trunk cache; --aug-views keeps it)")
    p.add_argument("--aug-views", type=int, default=RunOptions.aug_views, metavar="K",
                   help="K extra views per training image (random resized crop, scale 0.5-1, ratio 3/4-4/3, "
                        "horizontal flip; no colour jitter: colour is a tag), each view's features (probe) or trunk "
                        "(fine-tune) cached once per backbone: the probe's head trains on the original + K views; "
                        "the fine-tune shows each image as one of them, drawn per epoch. Validation and test are "
                        "never augmented")
    p.add_argument("--rebalance", choices=REBALANCE, default=RunOptions.rebalance,
                   help="crt: classifier re-training on a class-balanced re-sample (Kang et al. 2020) by repeat-factor "
                        "sampling (LVIS; tags under the long-tail threshold are repeated): the probe's head, or the "
                        "fine-tune's head re-trained on the fine-tuned features")
    p.add_argument("--colour", action="store_true",
                   help="the head also sees the image's colour histograms (joint RGB of the whole image and of its "
                        "foreground, 432 numbers, part of the model and of its export): for catalogs whose tags "
                        "include colour, which pretrained backbones are trained to ignore")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, subsets, shuffling and folds")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--force", action="store_true", help="retrain runs that are current")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def train_settings(args: argparse.Namespace, project: Project | None,
                   families: tuple[str, ...]) -> tuple[Profile, Settings]:
    """The profile and the settings: --profile's (else the project file's, else full), explicit flags on top (a
    --model or --image-size without FAMILY= sets ``families``)."""
    explicit = settings_from_flags(args.model, args.image_size, args.epochs, args.probe_epochs, args.max_train_images,
                                   args.cache_size, families)
    if args.profile or project is None:
        profile = PROFILES[args.profile or "full"]
        return profile, profile.settings.merged(explicit)
    return PROFILES[project.profile], project.settings.merged(explicit)


def plan_run(run_dir: Path, opts: RunOptions, spec: BackboneSpec, weights: str, dataset_hash: str,
             force: bool) -> tuple[bool, bool, str]:
    """(train it?, resume?, what to say) for one pair: a current run is left alone, a complete run trained with
    other options is retrained, an interrupted one resumes only when its options are unchanged."""
    if not (run_dir / CONFIG).is_file():
        return True, False, ""
    if force:
        return True, False, "retraining (--force)"
    config = read_json(run_dir / CONFIG)
    try:
        changed = run_changes(config, opts, spec, weights, dataset_hash)
    except (KeyError, TypeError, AttributeError) as e:
        changed = [f"unreadable {CONFIG} ({type(e).__name__}: {e})"]
    if is_complete(run_dir):
        if not changed:
            return False, False, f"current, nothing to do ({run_dir}; use --force to retrain)"
        return True, False, f"options changed ({', '.join(changed)}): retraining"
    if changed:
        return True, False, f"options changed since it was interrupted ({', '.join(changed)}): starting over"
    return True, opts.resume, "resuming" if opts.resume else ""


def main(argv: list[str] | None = None) -> int:
    w = distributed.init()
    try:
        return _main(argv, w)
    finally:
        distributed.shutdown()


def _main(argv: list[str] | None, w: distributed.World) -> int:
    args = add_verbosity_flags(parser()).parse_args(argv)
    if not w.main:  # one voice per job: the other ranks say only what goes wrong
        args.verbose, args.quiet, args.no_progress = 0, True, True
    args = setup_logging(args)
    if args.all == bool(args.backbone or args.strategy):
        raise SystemExit("give either --backbone and --strategy, or --all")
    if not args.all and not (args.backbone and args.strategy):
        raise SystemExit("--backbone and --strategy go together")
    if args.trials < 1 or args.aug_views < 0 or (args.threshold_shrink or 0) < 0 or \
            not math.isfinite(args.logit_adjust or 0.0):
        raise SystemExit("--trials must be >= 1, --aug-views and --threshold-shrink >= 0 and --logit-adjust finite")
    families = FAMILIES if args.all else (args.backbone,)
    strategies = STRATEGIES if args.all else (args.strategy,)
    bare = [m for m in args.model or [] if m.partition("=")[0] not in FAMILIES]
    if args.all and bare:
        raise SystemExit(f"--all --model {bare[0]}: name the family (FAMILY=NAME, e.g. cnn={bare[0]}): a bare name "
                         "would train the same model under all three families")
    try:
        project = project_for({"data": args.data, "runs": args.out})
    except ProjectError as e:
        raise SystemExit(str(e)) from None
    if project is not None:
        log.info(f"defaults from ./{PROJECT_FILE}: profile {project.profile}, --data {project.data}, "
                 f"--out {project.runs}")
    profile, settings = train_settings(args, project, families)
    try:
        resolved = resolve(settings)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if w.main:
        print(describe(profile, resolved, reductions(profile, resolved)))
    weights = per_family(args.weights or (project.weights if project else None), "--weights", families)
    weights_dir = args.weights_dir or (project.weights_dir if project else None)
    specs = {fam: get_spec(fam, resolved.model[fam], resolved.image_size[fam]) for fam in families}
    for fam, spec in specs.items():
        if warning := cache_warning(spec.img_size, resolved.cache_size):
            log.warning(f"{fam}: {warning}")
    if args.plan_weights:
        for fam, spec in specs.items():
            print(plan_weights(spec, weights.get(fam, "pretrained"), weights_dir).describe(spec))
        return 0
    data = args.data or (project.data if project else None)
    if not data:
        raise SystemExit(missing("--data", "the dataset directory"))
    out = args.out or (project.runs if project else "runs")
    try:
        dataset_hash = load_dataset(data).content_hash()
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    failures = []
    for fam, spec in specs.items():
        label = requested_weights(plan_weights(spec, weights.get(fam, "pretrained"), weights_dir))
        planned = {strat: RunOptions(family=fam, strategy=strat, model=spec.name, weights=weights.get(fam, "pretrained"),
                                     weights_dir=weights_dir, image_size=spec.img_size, cache_size=resolved.cache_size,
                                     max_train_images=resolved.max_train_images, loss=args.loss,
                                     epochs=resolved.epochs, batch_size=args.batch_size, lr=args.lr,
                                     augment=args.augment, seed=args.seed, device=args.device,
                                     resume=args.resume or args.all, progress=not args.no_progress, head=args.head,
                                     logit_adjust=args.logit_adjust, threshold_shrink=args.threshold_shrink,
                                     trials=args.trials, probe=ProbeConfig(epochs=resolved.probe_epochs),
                                     rebalance=args.rebalance, aug_views=args.aug_views, colour=args.colour,
                                     profile={"name": profile.name, "reductions": reductions(profile, resolved)})
                   for strat in strategies}
        # one pass per backbone: the probe's extraction also fills the trunk cache of a fine-tune that will train
        share = "ft" in planned and not args.augment and w.broadcast(
            plan_run(Path(out) / pair_name(fam, "ft"), planned["ft"], spec, label, dataset_hash, args.force)[0])
        for strat, opts in planned.items():  # probe first: fine-tune starts from the probe's head (LP-then-FT)
            name = pair_name(fam, strat)  # rank 0's plan is the job's (the run files are what it writes)
            train, resume, say = w.broadcast(plan_run(Path(out) / name, opts, spec, label, dataset_hash, args.force))
            if say:
                log.info(f"{name}: {say}")
            if not train:
                continue
            t = time.perf_counter()
            try:
                run_dir = train_pair(data, out, replace(opts, resume=resume), share_pass=share and strat == "probe")
            except (WeightsNotFound, RunError, TrainingDiverged, ValueError) as e:
                log.error(f"{name}: FAILED: {e}")
                if w.distributed:  # the ranks may have failed at different points: torchrun stops them all
                    raise SystemExit(1) from None
                failures.append(name)
                continue
            log.info(f"{name}: done in {time.perf_counter() - t:.0f} s -> {run_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
