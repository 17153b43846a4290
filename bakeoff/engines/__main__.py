"""python -m engines bench [--runs RUNS] [--runtime torch|onnxruntime|tensorrt] [--precision P] [--batch 1,8,32]
    [--warmup 2.0] [--duration 10.0] [--iterations 10] [--threads N] [--device D] [--cuda-graph]
    [--data DATASET] [--project t4] [--pairs a,b]

Benchmarks every complete run under RUNS (or the named pairs): prints trtexec-style performance summaries
(Latency = H2D + GPU compute + D2H on GPU, the wall time of one call on CPU) and writes
RUNS/<pair>/latency/<runtime>[-<precision>].json. --runs defaults to ./bakeoff.json's (written by python -m
reports.pipeline), --runtime to torch. The summaries go to stdout; status to stderr (-q: warnings and errors
only; -v: providers, per-batch timings); a progress bar counts the (run, batch size) benchmarks (--no-progress
or -q: none).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from bakeoff.common.log import add_verbosity_flags, progress_bar, progress_enabled, setup_logging
from bakeoff.engines import RUNTIMES
from bakeoff.engines.bench import bench_pair, format_trtexec, latency_path
from bakeoff.engines.projection import TARGETS
from bakeoff.train.project import PROJECT_FILE, fill
from bakeoff.train.run import is_complete

log = logging.getLogger("bakeoff.engines")  # not __name__: python -m engines runs this module as __main__

# the runner options each runtime takes
RUNNER_OPTIONS = {"torch": ("device", "threads", "cuda_graph"), "onnxruntime": ("device", "threads"),
                  "tensorrt": ("cuda_graph",)}


def _csv(text: str) -> list[str]:
    return [t for t in text.replace(",", " ").split() if t]


def main(argv: list[str] | None = None) -> int:
    ap = add_verbosity_flags(argparse.ArgumentParser(prog="python -m engines", description=__doc__.splitlines()[0]))
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="trtexec-style latency benchmark")
    b.add_argument("--runs", type=Path, help=f"directory of run directories (<family>-<strategy>; default: "
                                             f"./{PROJECT_FILE}'s)")
    b.add_argument("--runtime", default="torch", choices=sorted(RUNTIMES), help="(default: %(default)s)")
    b.add_argument("--precision", help="torch: fp32|fp16|bf16; onnxruntime: fp32|fp16; tensorrt: fp16")
    b.add_argument("--batch", default="1,8,32", help="batch sizes, comma-separated")
    b.add_argument("--warmup", type=float, default=2.0, help="warm-up duration, seconds")
    b.add_argument("--duration", type=float, default=10.0, help="minimum timed duration per batch size, seconds")
    b.add_argument("--iterations", type=int, default=10, help="minimum timed iterations per batch size")
    b.add_argument("--threads", type=int, help="CPU intra-op threads (default: $OMP_NUM_THREADS, else every core)")
    b.add_argument("--device", default=None, help="torch: auto|cpu|cuda; onnxruntime: cpu|cuda|tensorrt|auto")
    b.add_argument("--cuda-graph", action="store_true", help="replay CUDA graphs (torch on GPU, tensorrt)")
    b.add_argument("--data", type=Path, help="use this dataset's preprocessed test images instead of random inputs")
    b.add_argument("--project", choices=sorted(TARGETS), help="add a labelled ESTIMATE for this GPU when not on it")
    b.add_argument("--pairs", help="only these pairs, comma-separated (default: every complete run)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbosity_flags(b)
    args = setup_logging(ap.parse_args(argv))
    fill(b, args, {"runs": "runs"})
    args.runs = Path(args.runs)
    if not args.runs.is_dir():
        ap.error(f"{args.runs}: no such directory")
    wanted = _csv(args.pairs) if args.pairs else None
    run_dirs = [d for d in sorted(args.runs.iterdir()) if is_complete(d) and (wanted is None or d.name in wanted)]
    missing = sorted(set(wanted or ()) - {d.name for d in run_dirs})
    if missing or not run_dirs:
        ap.error(f"{args.runs}: no complete run named {missing}" if missing else f"{args.runs}: no complete runs")
    options = {"device": args.device, "threads": args.threads, "cuda_graph": args.cuda_graph}
    runner_kw = {k: options[k] for k in RUNNER_OPTIONS[args.runtime] if options[k] not in (None, False)}
    batches = [int(x) for x in _csv(args.batch)]
    failed = []
    with progress_bar(progress_enabled(args), total=len(run_dirs) * len(batches), desc=f"bench {args.runtime}",
                      unit="bench") as bar:
        for run_dir in run_dirs:
            bar.set_postfix_str(run_dir.name)
            measured = []

            def step(batch: int, pair: str = run_dir.name, measured: list = measured) -> None:
                measured.append(batch)
                bar.set_postfix_str(f"{pair}, batch {batch} done", refresh=False)
                bar.update()

            try:
                result = bench_pair(run_dir, args.runtime, batches, args.precision, args.warmup, args.duration,
                                    args.iterations, args.data, args.project, args.seed, on_batch=step, **runner_kw)
            except (OSError, RuntimeError, ValueError) as e:  # a missing export, a provider, a mismatched engine
                log.error(f"SKIP {run_dir.name}: {e}")
                failed.append(run_dir.name)
                bar.update(len(batches) - len(measured))  # its batch sizes will not be measured
                continue
            tqdm.write(format_trtexec(result) + "\n", file=sys.stdout)  # stdout; clears and redraws the bar
            sys.stdout.flush()
            log.info(f"wrote {latency_path(run_dir, args.runtime, result['precision'])}")
    if failed:
        log.error(f"{len(failed)} of {len(run_dirs)} runs not benchmarked: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
