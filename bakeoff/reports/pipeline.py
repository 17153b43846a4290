"""The whole chain in one command, resumable: catalog -> dataset -> runs -> exports -> scores -> latency -> report.

    python -m reports.pipeline                       # the embedded synthetic default (profile demo)
    python -m reports.pipeline --data data/fashion --skip-data [--profile cpu]   # your catalog (profile full)

Each stage is its own CLI, run as a subprocess (this module imports no model code); every stage skips or
resumes work already done, so rerunning after an interrupt continues where it stopped, and a run trained with
other options is retrained. Training options come from a profile (``train.profiles``): ``demo`` without
``--data``, ``full`` (native input sizes, default schedules) with it, ``--profile`` to choose; explicit flags
override it. The first stage (``python -m train --all --plan-weights``) prints the profile, every reduction
against ``full`` and where each family's weights will come from. Weights: ``auto`` takes pretrained weights
wherever reachable offline (``--weights-dir`` / ``$BAKEOFF_WEIGHTS``, the hub cache) and runs the other
families with explicit random init, flagged in every artifact.

It writes ``./bakeoff.json`` (``train.project``) first: the dataset, runs and report directories, the profile
and its settings, so each stage's own command works as typed afterwards (``python -m train --backbone clip
--strategy ft``, ``python -m export --fp16``, ``python -m evaluate``, ``python -m engines bench``, ``python -m
reports``). Checks that fail in export, evaluate or bench are recorded and the chain goes on; ``--strict`` makes
them a non-zero exit.

Its own lines go to stderr; ``-q`` (warnings and errors only, no progress bars) and ``-v`` (debug detail: the
full command lines, the stages' per-step timings) are passed on to every stage, and ``--no-progress`` to the
stages with progress bars (train and evaluate never show theirs here).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bakeoff.common.log import add_verbosity_flags, setup_logging, verbosity_argv
from bakeoff.train.profiles import PROFILES, Settings, settings_from_flags
from bakeoff.train.project import PROJECT_FILE, Project, write_project

log = logging.getLogger("bakeoff.reports.pipeline")  # (python -m reports.pipeline runs this module as __main__)

# The embedded default dataset: a synthetic catalog small enough for 2 CPU cores in minutes (profile demo).
DEMO_DATA = {"data": "data/demo", "images": 2000, "tags": 250, "synth_size": 64, "test_size": "0.2"}


# Stages whose exit code 1 means "some run failed a check" (parity, a NaN evaluation, a runtime that could not
# be benchmarked): recorded in that run's artifacts and shown in the report, so the chain goes on (--strict: and
# the pipeline's exit is 1).
SOFT = ("export", "evaluate", "bench")

# A stage's name, and what runs it, decided just before it would run (a stage may depend on what earlier
# stages wrote): its argv, or the reason it is skipped.
Stage = tuple[str, Callable[[], list[str] | str]]


def engine_pairs(runs: Path) -> list[str]:
    """Runs with a TensorRT engine (export/*.engine, built by the export stage where TensorRT and a GPU exist)."""
    return sorted({p.parents[1].name for p in runs.glob("*/export/*.engine")})


def stages(a: argparse.Namespace) -> list[Stage]:
    """Every stage, in order; each stage's command carries this command's -v/-q (``verbosity_argv``)."""
    passed_on = verbosity_argv(a)
    return [(name, _with_flags(build, passed_on)) for name, build in _stages(a)]


def _with_flags(build: Callable[[], list[str] | str], flags: list[str]) -> Callable[[], list[str] | str]:
    def with_flags() -> list[str] | str:
        argv = build()
        return argv + flags if isinstance(argv, list) and flags else argv
    return with_flags


def _stages(a: argparse.Namespace) -> list[Stage]:
    """Every stage, in order, without the verbosity flags."""
    py = [sys.executable, "-m"]
    data, runs, out = str(a.data), str(a.runs), str(a.out)
    weights = ["--weights", a.weights] + (["--weights-dir", a.weights_dir] if a.weights_dir else [])
    options = ["--profile", a.profile, *weights, *a.explicit.argv()]
    no_progress = ["--no-progress"] if getattr(a, "no_progress", False) else []
    evaluate = py + ["bakeoff.evaluate", "--runs", runs, "--data", data, "--no-progress", "--runtime"]
    bench = py + ["bakeoff.engines", "bench", "--runs", runs, "--batch", "1,8,32", "--warmup", "0.5", "--duration",
                  str(a.bench_seconds), "--project", "t4", *no_progress, "--runtime"]

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
        ("weights", lambda: py + ["bakeoff.train", "--all", "--plan-weights"] + options),
        ("synth", unless(a.data / "manifest.csv",
                         py + ["bakeoff.train.data", "synth", "--out", data, "--images", str(a.images), "--tags", str(a.tags),
                               "--image-size", str(a.synth_size)])),
        ("prepare", unless(a.data / "splits.json", py + ["bakeoff.train.data", "prepare", data, "--test-size", a.test_size])),
        ("train", lambda: py + ["bakeoff.train", "--all", "--data", data, "--out", runs, "--no-progress"] + options),
        ("export", lambda: py + ["bakeoff.export", "--fp16", "--runs", runs, "--data", data, *no_progress]),
        ("evaluate torch", lambda: evaluate + ["torch"]),
        ("evaluate onnxruntime", lambda: evaluate + ["onnxruntime"]),
        ("evaluate onnxruntime fp16", lambda: evaluate + ["onnxruntime", "--precision", "fp16"]),
        ("evaluate tensorrt", on_engines(evaluate + ["tensorrt"])),
        ("bench torch", lambda: bench + ["torch"]),
        ("bench onnxruntime", lambda: bench + ["onnxruntime"]),
        ("bench tensorrt", on_engines(bench + ["tensorrt"])),
        ("report", lambda: py + ["bakeoff.reports", "--runs", runs, "--out", out] + constraints),
    ]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reports.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help=f"your prepared (or imported) dataset; default: the synthetic "
                                             f"{DEMO_DATA['data']}, made by the first stages")
    p.add_argument("--runs", type=Path, help="runs directory (default: runs/<name of --data>)")
    p.add_argument("--out", type=Path, help="report directory (default: report/<name of --data>)")
    p.add_argument("--profile", choices=PROFILES, help="training profile (default: demo without --data, full with "
                   "it): " + "; ".join(f"{n}: {q.summary}" for n, q in PROFILES.items()))
    p.add_argument("--skip-data", action="store_true", help="the dataset exists and is prepared: start at training")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any check fails (export parity, an "
                   "evaluation, a benchmark); without it they are recorded, reported and the chain goes on")
    p.add_argument("--weights", default="auto", help="auto | pretrained | random (per family: FAMILY=VALUE)")
    p.add_argument("--weights-dir", default=os.environ.get("BAKEOFF_WEIGHTS"))
    g = p.add_argument_group("training options (override the profile; listed among its reductions)")
    g.add_argument("--model", action="append", help="FAMILY=NAME registry variant")
    g.add_argument("--image-size", action="append", help="FAMILY=PX (or PX for every family)")
    g.add_argument("--epochs", type=int, help="fine-tune epochs")
    g.add_argument("--probe-epochs", type=int, help="linear-probe epochs")
    g.add_argument("--max-train-images", type=int, help="stratified subset of train")
    g.add_argument("--cache-size", type=int, help="image cache px (default: the largest input size)")
    d = p.add_argument_group("the synthetic catalog (without --data)")
    d.add_argument("--images", type=int, default=DEMO_DATA["images"])
    d.add_argument("--tags", type=int, default=DEMO_DATA["tags"])
    d.add_argument("--synth-size", type=int, default=DEMO_DATA["synth_size"])
    p.add_argument("--test-size", default=DEMO_DATA["test_size"], help="prepare's test split: images or a fraction")
    p.add_argument("--bench-seconds", type=float, default=1.0)
    p.add_argument("--latency-budget-ms", type=float, help="passed to python -m reports")
    p.add_argument("--target-runtime", help="passed to python -m reports (torch | onnxruntime | tensorrt[-PRECISION])")
    p.add_argument("--min-tail-f1", type=float, help="passed to python -m reports")
    p.add_argument("--no-progress", action="store_true", help="no progress bars in the export and bench stages "
                   "(train and evaluate run without theirs here)")
    a = add_verbosity_flags(p).parse_args(argv)
    a.synthetic = a.data is None
    a.data = a.data or Path(DEMO_DATA["data"])
    a.runs = a.runs or Path("runs") / a.data.name
    a.out = a.out or Path("report") / a.data.name
    a.profile = a.profile or ("demo" if a.synthetic else "full")
    a.explicit = settings_from_flags(a.model, a.image_size, a.epochs, a.probe_epochs, a.max_train_images,
                                     a.cache_size)
    return a


def project(a: argparse.Namespace) -> Project:
    """What ./bakeoff.json records for the stage commands typed afterwards."""
    settings: Settings = PROFILES[a.profile].settings.merged(a.explicit)
    return Project(str(a.data), str(a.runs), str(a.out), a.profile, settings, [a.weights], a.weights_dir)


def data_problem(a: argparse.Namespace) -> str | None:
    """Why the chain cannot start on ``a.data`` (None when it can): only the demo makes a synthetic catalog."""
    if a.synthetic or a.profile == "demo" or (a.data / "manifest.csv").exists():
        return None
    return (f"{a.data}: no dataset (no manifest.csv). Import your catalog first (python -m train.data import csv ... "
            f"--out {a.data}), or pass --profile demo to make the synthetic one there")


def main(argv: list[str] | None = None) -> int:
    a = setup_logging(parse(argv))
    if problem := data_problem(a):
        log.error(problem)
        return 2
    write_project(project(a))
    log.info(f"wrote ./{PROJECT_FILE}: the defaults of every stage command typed from here (profile {a.profile}, "
             f"--data {a.data}, --runs {a.runs}, report {a.out})")
    t0 = time.perf_counter()
    plan = stages(a)
    soft_failures = []
    for k, (name, build) in enumerate(plan, 1):
        argv_ = build()
        if isinstance(argv_, str):
            log.info(f"[{k}/{len(plan)}] {name}: {argv_}, skipped")
            continue
        log.info(f"[{k}/{len(plan)}] {name}: {shlex.join(argv_[1:])}")
        log.debug(f"[{k}/{len(plan)}] {name}: {shlex.join(argv_)}")
        sys.stdout.flush()  # what this process printed comes before the stage's own output
        t = time.perf_counter()
        rc = subprocess.call(argv_)
        log.info(f"[{k}/{len(plan)}] {name}: exit {rc} after {time.perf_counter() - t:.0f} s")
        if rc == 1 and name.startswith(SOFT):
            soft_failures.append(name)
            log.warning(f"[{k}/{len(plan)}] {name}: some runs failed a check (see above); recorded, continuing")
        elif rc != 0:
            log.error(f"pipeline stopped at '{name}' (exit {rc}); fix it and rerun: finished work is kept")
            return rc
    log.info(f"pipeline done in {time.perf_counter() - t0:.0f} s: {a.out / 'report.html'}")
    if soft_failures:
        log.warning(f"checks failed in: {', '.join(soft_failures)} (see the report)")
    return 1 if a.strict and soft_failures else 0


if __name__ == "__main__":
    sys.exit(main())
