"""Score runs on the test split, or compare scored runs.

    python -m evaluate [--runs RUNS --data DATASET] [--runtime torch] [--precision bf16] [--pairs cnn-probe,...]
    python -m evaluate compare [RUNS] [--runtime torch] [--precision P] [--data DATASET]
    python -m evaluate compare [RUNS] --runtimes torch,onnxruntime,onnxruntime-fp16
    python -m evaluate rescore [--runs RUNS --data DATASET]   (scores again from saved predictions, no model run)
    torchrun --nproc-per-node N -m evaluate ...   (scoring: the ranks share the test images; rank 0 writes)

RUNS and DATASET default to ./bakeoff.json's (written by python -m reports.pipeline). Tables go to stdout,
status to stderr (-q: warnings and errors only, no progress bars; -v: debug detail).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from bakeoff.common import distributed
from bakeoff.common.device import setup_threads
from bakeoff.common.log import add_verbosity_flags, progress_enabled, setup_logging
from bakeoff.evaluate.compare import compare_table
from bakeoff.evaluate.score import evaluate_all, rescore_run, run_dirs
from bakeoff.train.data.dataset import DatasetError, load_dataset
from bakeoff.train.project import PROJECT_FILE, fill
from bakeoff.train.run import RunError

log = logging.getLogger("bakeoff.evaluate")  # not __name__: python -m evaluate runs this module as __main__
# evaluate_all's lines for a run it could not score: "<pair>: REFUSED: ..." and "<pair>: FAILED (<eval>): ..."
NOT_SCORED = re.compile(r"^\S+: (REFUSED: |FAILED \()")


def score_line(line: str) -> None:
    """One line of ``evaluate_all``: an error when it says a run was not scored, else INFO."""
    log.log(logging.ERROR if NOT_SCORED.match(line) else logging.INFO, line)


def split_list(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", help=f"runs directory (python -m train --out; default: ./{PROJECT_FILE}'s)")
    p.add_argument("--data", help=f"dataset directory the runs were trained on (default: ./{PROJECT_FILE}'s)")
    p.add_argument("--runtime", default="torch", help="torch | onnxruntime | tensorrt (engines.runners.RUNTIMES)")
    p.add_argument("--precision", help="fp32 | bf16 | fp16 (default: the runtime's own)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pairs", type=split_list, help="comma-separated run names (default: every run)")
    p.add_argument("--force", action="store_true", help="re-score evaluations that are already current")
    p.add_argument("--no-progress", action="store_true")
    return add_verbosity_flags(p)


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate compare", description="One table of the evaluated runs.")
    p.add_argument("runs", nargs="?", help=f"runs directory (default: ./{PROJECT_FILE}'s)")
    p.add_argument("--runtime", default="torch")
    p.add_argument("--precision", help="compare this precision of --runtime (default: the runtime's own)")
    p.add_argument("--data", help="dataset for the verdict's test labels (default: the one recorded in metrics.json)")
    p.add_argument("--runtimes", type=split_list,
                   help="compare evaluations instead, e.g. torch,onnxruntime,onnxruntime-fp16 (first = reference)")
    return add_verbosity_flags(p)


def rescore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate rescore", description=rescore_run.__doc__)
    p.add_argument("--runs", help=f"runs directory (default: ./{PROJECT_FILE}'s)")
    p.add_argument("--data", help=f"dataset directory the runs were trained on (default: ./{PROJECT_FILE}'s)")
    return add_verbosity_flags(p)


def parsed(p: argparse.ArgumentParser, argv: list[str], defaults: dict[str, str], quiet: bool = False
           ) -> argparse.Namespace:
    """``argv`` parsed (logging set up from its -v/-q, or quiet), with what it leaves unset of ``defaults`` taken
    from the project file."""
    args = p.parse_args(argv)
    if quiet:
        args.verbose, args.quiet = 0, True
    args = setup_logging(args)
    fill(p, args, defaults)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["rescore"]:
            args = parsed(rescore_parser(), argv[1:], {"runs": "runs", "data": "data"})
            ds = load_dataset(args.data)
            for run_dir in run_dirs(args.runs):
                for name, what in rescore_run(run_dir, ds).items():
                    log.info(f"{run_dir.name} ({name}): {what}")
            return 0
        if argv[:1] == ["compare"]:
            args = parsed(compare_parser(), argv[1:], {"runs": "runs"})
            print(compare_table(args.runs, args.runtime, args.precision, data=args.data, runtimes=args.runtimes)[1])
            return 0
        w = distributed.init()
        args = parsed(score_parser(), argv, {"runs": "runs", "data": "data"}, quiet=not w.main)  # one voice per job
        threads = setup_threads()
        kw = {"device": args.device} | ({"precision": args.precision} if args.precision else {})
        log.debug(f"evaluating {args.runs} on {args.data}: runtime {args.runtime}, {kw}, batch {args.batch_size}, "
                  f"{threads} CPU threads")
        results = evaluate_all(args.runs, args.data, args.runtime, pairs=args.pairs, batch_size=args.batch_size,
                               progress=progress_enabled(args), force=args.force, log=score_line, **kw)
    except (RunError, DatasetError, ValueError) as e:
        log.error(str(e))
        return 2
    finally:
        distributed.shutdown()
    bad = [p for p, m in results.items() if m["status"] in ("failed", "refused")]
    if bad:
        log.error(f"{len(bad)} of {len(results)} runs not scored: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
