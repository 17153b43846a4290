"""python -m reports [--runs RUNS] [--out REPORT_DIR] [--latency-budget-ms MS] [--target-runtime RT]
    [--min-tail-f1 F] [--data DATASET]

Writes REPORT_DIR/report.md, report.html (self-contained), figures/*.png and summary.json from the artifacts
under RUNS, and prints the recommendation (stdout; what was written goes to stderr, hidden by -q). --runs and
--out default to ./bakeoff.json's (written by python -m reports.pipeline).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from bakeoff.common.log import add_verbosity_flags, setup_logging
from bakeoff.reports.artifacts import ReportError
from bakeoff.reports.build import build_report
from bakeoff.train.project import PROJECT_FILE, fill

log = logging.getLogger("bakeoff.reports")  # not __name__: python -m reports runs this module as __main__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", help=f"runs directory (python -m train --out; default: ./{PROJECT_FILE}'s)")
    p.add_argument("--out", help=f"report directory to write (default: ./{PROJECT_FILE}'s)")
    p.add_argument("--latency-budget-ms", type=float, help="p99 latency at batch 1 a pair must meet")
    p.add_argument("--target-runtime", help="judge every pair on this runtime's own latency and evaluation: torch | "
                   "onnxruntime | tensorrt (at its default precision: fp32, fp32, fp16), or <runtime>-<precision>")
    p.add_argument("--min-tail-f1", type=float, help="minimum long-tail macro-F1")
    p.add_argument("--data", help="dataset directory for the test labels (default: the one the evaluations record)")
    args = setup_logging(add_verbosity_flags(p).parse_args(argv))
    fill(p, args, {"runs": "runs", "out": "report"})
    start = time.perf_counter()
    try:
        summary = build_report(args.runs, args.out, latency_budget_ms=args.latency_budget_ms,
                               target_runtime=args.target_runtime, min_tail_f1=args.min_tail_f1, data=args.data)
    except (ReportError, ValueError) as e:
        log.error(str(e))
        return 2
    rec = summary["recommendation"]
    print("\n".join(rec["rule"] + [""] + [t.replace("**", "") for t in rec["text"]]), flush=True)
    log.info(f"wrote {args.out}/report.md, report.html, summary.json and {len(summary['figures'])} figures")
    log.debug(f"report built from {args.runs} in {time.perf_counter() - start:.1f} s; figures: "
              + ", ".join(f["file"] for f in summary["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
