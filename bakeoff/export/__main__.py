"""python -m export --fp16 [--runs RUNS] [--data DATASET] [--pairs cnn-probe ...] [--target t4]

Exports every complete run (ONNX fp32; with --fp16 also the FP16 ONNX and, where TensorRT and a CUDA GPU
exist, an FP16 engine for this GPU), checks parity against PyTorch on test images, and exits non-zero when any
run fails. A current export is skipped; with --fp16, this GPU's engine is (re)built when it is absent or its
sidecar check refuses it (another TensorRT version, changed sources, no passed parity check), reusing a current
ONNX export. --runs defaults to ./bakeoff.json's (written by python -m reports.pipeline).

Status goes to stderr (-q: warnings and errors only; -v: per-step timings and file paths); progress bars
count the runs, each run's steps and TensorRT's build phases (--no-progress or -q: none).
"""
from __future__ import annotations

import argparse
import logging
import sys

from bakeoff.common.log import add_verbosity_flags, progress_enabled, setup_logging
from bakeoff.export.parity import Tolerance
from bakeoff.export.pipeline import ExportOptions, export_runs, find_runs
from bakeoff.export.tensorrt import TARGETS, EngineOptions, profile_shapes
from bakeoff.train.project import PROJECT_FILE, fill

log = logging.getLogger("bakeoff.export")  # not __name__: python -m export runs this module as __main__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", help=f"runs directory (python -m train --out; default: ./{PROJECT_FILE}'s)")
    p.add_argument("--fp16", action="store_true", help="also the FP16 ONNX and the FP16 TensorRT engine")
    p.add_argument("--data", help="dataset for the parity images (default: each run's own dataset)")
    p.add_argument("--pairs", nargs="+", help="only these runs, e.g. cnn-probe dinov2-ft")
    p.add_argument("--target", choices=sorted(TARGETS), help="warn when the build GPU is not this one")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace limit")
    p.add_argument("--parity-images", type=int, default=256, help="test images for the parity check")
    p.add_argument("--force", action="store_true", help="re-export runs whose export is already current")
    p.add_argument("--fp32-max-flips", type=float, default=0.001, help="max fraction of flipped decisions, fp32")
    p.add_argument("--fp32-max-dprob", type=float, default=1e-3, help="max |delta probability|, fp32")
    p.add_argument("--fp16-max-flips", type=float, default=0.005, help="max fraction of flipped decisions, fp16")
    p.add_argument("--fp16-max-dprob", type=float, help="max |delta probability|, fp16 (default: not judged)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return add_verbosity_flags(p)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = setup_logging(p.parse_args(argv))
    fill(p, a, {"runs": "runs"})
    try:
        profile_shapes(1, a.min_batch, a.opt_batch, a.max_batch)
    except ValueError as e:
        p.error(str(e))
    opts = ExportOptions(
        fp16=a.fp16, data=a.data, n_images=a.parity_images,
        tolerances={"fp32": Tolerance(a.fp32_max_flips, a.fp32_max_dprob), "fp16": Tolerance(a.fp16_max_flips, a.fp16_max_dprob)},
        engine=EngineOptions(a.min_batch, a.opt_batch, a.max_batch, a.workspace_gb, a.target), force=a.force,
        progress=progress_enabled(a))
    try:
        runs, skipped = find_runs(a.runs, a.pairs)
    except FileNotFoundError as e:
        log.error(str(e))
        return 2
    for line in skipped:
        log.warning(line)
    log.debug(f"exporting {[r.name for r in runs]} from {a.runs}: {opts}")
    failed = export_runs(runs, opts)
    if not runs:
        log.error(f"{a.runs}: no complete run to export")
    elif failed:
        log.error(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
