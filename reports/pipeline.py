"""The whole chain in one command, resumable: catalog -> dataset -> runs -> exports -> scores -> latency -> report.

    python -m reports.pipeline                       # the embedded synthetic default, CPU-sized
    python -m reports.pipeline --data data/fashion --runs runs/fashion --out report/fashion --skip-data

Each stage is its own CLI, run as a subprocess (this module imports no model code); every stage skips or
resumes work already done, so rerunning after an interrupt continues where it stopped. Weights: ``auto`` takes
pretrained weights wherever reachable offline (``--weights-dir`` / ``$BAKEOFF_WEIGHTS``, the hub cache) and
runs the other families with explicit random init: the first stage (``python -m train --plan-weights``) prints
where each family's weights will come from, and every artifact flags random init.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

DEMO = {  # the embedded default: small enough for 2 CPU cores in minutes
    "images": 2000, "tags": 250, "synth_size": 64, "cache_size": 64, "test_size": "0.2",
    "image_size": ["cnn=64", "dinov2=56", "clip=64"], "epochs": 2, "probe_epochs": 12,
    "model": ["cnn=efficientnet_lite0"],  # the CPU-friendly CNN (and the one with offline weights here)
}


# Stages whose exit code 1 means "some run failed a check" (parity, a NaN evaluation, a runtime that could not
# be benchmarked): recorded in that run's artifacts and shown in the report, so the chain goes on.
SOFT = ("export", "evaluate", "bench")

# A stage's name, and what runs it, decided just before it would run (a stage may depend on what earlier
# stages wrote): its argv, or the reason it is skipped.
Stage = tuple[str, Callable[[], list[str] | str]]


def engine_pairs(runs: Path) -> list[str]:
    """Runs with a TensorRT engine (export/*.engine, built by the export stage where TensorRT and a GPU exist)."""
    return sorted({p.parents[1].name for p in runs.glob("*/export/*.engine")})


def stages(a: argparse.Namespace) -> list[Stage]:
    """Every stage, in order."""
    py = [sys.executable, "-m"]
    data, runs, out = str(a.data), str(a.runs), str(a.out)
    weights = ["--weights", a.weights] + (["--weights-dir", a.weights_dir] if a.weights_dir else [])
    sizes = [x for s in a.image_size for x in ("--image-size", s)]
    models = [x for m in a.model for x in ("--model", m)]
    evaluate = py + ["evaluate", "--runs", runs, "--data", data, "--no-progress", "--runtime"]
    bench = py + ["engines", "bench", "--runs", runs, "--batch", "1,8,32", "--warmup", "0.5", "--duration",
                  str(a.bench_seconds), "--project", "t4", "--runtime"]

    def unless(marker: Path, argv: list[str]) -> Callable[[], list[str] | str]:
        return lambda: "done already" if a.skip_data or marker.exists() else argv

    def on_engines(argv: list[str]) -> Callable[[], list[str] | str]:
        def build() -> list[str] | str:
            found = engine_pairs(a.runs)
            return argv + ["--pairs", ",".join(found)] if found else f"no TensorRT engine under {runs}/*/export"
        return build

    constraints = [x for flag, v in (("--latency-budget-ms", a.latency_budget_ms),
                                     ("--target-runtime", a.target_runtime), ("--min-tail-f1", a.min_tail_f1))
                   if v is not None for x in (flag, str(v))]
    return [
        ("weights", lambda: py + ["train", "--all", "--plan-weights"] + weights + models),
        ("synth", unless(a.data / "manifest.csv",
                         py + ["train.data", "synth", "--out", data, "--images", str(a.images), "--tags", str(a.tags),
                               "--image-size", str(a.synth_size)])),
        ("prepare", unless(a.data / "splits.json",
                           py + ["train.data", "prepare", data, "--test-size", a.test_size, "--cache-size",
                                 str(a.cache_size)])),
        ("train", lambda: py + ["train", "--all", "--data", data, "--out", runs, "--cache-size", str(a.cache_size),
                                "--epochs", str(a.epochs), "--probe-epochs", str(a.probe_epochs), "--no-progress"]
         + weights + sizes + models),
        ("export", lambda: py + ["export", "--fp16", "--runs", runs, "--data", data]),
        ("evaluate torch", lambda: evaluate + ["torch"]),
        ("evaluate onnxruntime", lambda: evaluate + ["onnxruntime"]),
        ("evaluate onnxruntime fp16", lambda: evaluate + ["onnxruntime", "--precision", "fp16"]),
        ("evaluate tensorrt", on_engines(evaluate + ["tensorrt"])),
        ("bench torch", lambda: bench + ["torch"]),
        ("bench onnxruntime", lambda: bench + ["onnxruntime"]),
        ("bench tensorrt", on_engines(bench + ["tensorrt"])),
        ("report", lambda: py + ["reports", "--runs", runs, "--out", out] + constraints),
    ]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reports.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--runs", type=Path, default=Path("runs/demo"))
    p.add_argument("--out", type=Path, default=Path("report/demo"))
    p.add_argument("--skip-data", action="store_true", help="the dataset exists and is prepared: start at training")
    p.add_argument("--weights", default="auto", help="auto | pretrained | random (per family: FAMILY=VALUE)")
    p.add_argument("--weights-dir", default=os.environ.get("BAKEOFF_WEIGHTS"))
    p.add_argument("--model", action="append", default=None, help="FAMILY=NAME registry variant")
    p.add_argument("--image-size", action="append", default=None, help="FAMILY=PX")
    p.add_argument("--images", type=int, default=DEMO["images"])
    p.add_argument("--tags", type=int, default=DEMO["tags"])
    p.add_argument("--synth-size", type=int, default=DEMO["synth_size"])
    p.add_argument("--cache-size", type=int, default=DEMO["cache_size"])
    p.add_argument("--test-size", default=DEMO["test_size"])
    p.add_argument("--epochs", type=int, default=DEMO["epochs"])
    p.add_argument("--probe-epochs", type=int, default=DEMO["probe_epochs"])
    p.add_argument("--bench-seconds", type=float, default=1.0)
    p.add_argument("--latency-budget-ms", type=float, help="passed to python -m reports")
    p.add_argument("--target-runtime", help="passed to python -m reports (torch | onnxruntime | tensorrt[-PRECISION])")
    p.add_argument("--min-tail-f1", type=float, help="passed to python -m reports")
    a = p.parse_args(argv)
    a.image_size = a.image_size or DEMO["image_size"]
    a.model = a.model or DEMO["model"]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    t0 = time.perf_counter()
    plan = stages(a)
    soft_failures = []
    for k, (name, build) in enumerate(plan, 1):
        argv_ = build()
        if isinstance(argv_, str):
            print(f"[{k}/{len(plan)}] {name}: {argv_}, skipped")
            continue
        print(f"[{k}/{len(plan)}] {name}: {shlex.join(argv_[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(argv_)
        print(f"[{k}/{len(plan)}] {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc == 1 and name.startswith(SOFT):
            soft_failures.append(name)
            print(f"[{k}/{len(plan)}] {name}: some runs failed a check (see above); recorded, continuing")
        elif rc != 0:
            print(f"pipeline stopped at '{name}' (exit {rc}); fix it and rerun: finished work is kept")
            return rc
    print(f"pipeline done in {time.perf_counter() - t0:.0f} s: {a.out / 'report.html'}"
          + (f"; checks failed in: {', '.join(soft_failures)} (see the report)" if soft_failures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
