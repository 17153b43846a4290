"""python -m engines bench's feedback: one bar step per (run, batch size), summaries on stdout whatever the
verbosity, status on stderr (-q: errors only; -v: the runner's providers and per-batch timings)."""
from __future__ import annotations

import contextlib
import io

from bakeoff.engines.__main__ import main
from tests.progress import Terminal

FAST = ["--runtime", "onnxruntime", "--batch", "1,2", "--warmup", "0", "--duration", "0", "--iterations", "2",
        "--threads", "1"]


def bench(*argv: str, terminal: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), Terminal() if terminal else io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bench", *argv])
    return code, out.getvalue(), err.getvalue()


def test_bar_counts_each_run_and_batch_size(runs_onnx, bars):
    """cnn-probe is measured at batch 1 and 2 (a step each); cnn-ft has no export: its two steps are counted when
    it is refused, so the bar ends full."""
    code, out, err = bench("--runs", str(runs_onnx), *FAST, terminal=True)
    assert code == 1
    (bar,) = bars
    assert (bar.desc, bar.total, bar.shown) == ("bench onnxruntime", 4, True)
    assert bar.steps == [2, 1, 1]  # cnn-ft (refused: both its batch sizes at once), then cnn-probe's 1 and 2
    assert "bench onnxruntime: 100%" in err and "4/4" in err
    assert out.count("=== Performance summary ===") == 1  # stdout: the summary alone, no bar
    assert "%|" not in out


def test_quiet_keeps_the_summary_and_the_errors(runs_onnx, bars):
    code, out, err = bench("--runs", str(runs_onnx), *FAST, "-q", terminal=True)
    assert code == 1 and out.count("=== Performance summary ===") == 1
    assert [b.shown for b in bars] == [False]
    assert "wrote " not in err and "%|" not in err
    assert err.startswith("error: SKIP cnn-ft: ") and "error: 1 of 2 runs not benchmarked: cnn-ft" in err


def test_verbose_shows_providers_and_per_batch_timings(runs_onnx):
    code, out, err = bench("-v", "--runs", str(runs_onnx), *FAST, "--pairs", "cnn-probe")
    assert code == 0 and "=== Performance summary ===" in out
    assert "'providers': ['CPUExecutionProvider']" in err  # the runner, as opened
    assert "onnxruntime fp32 batch 1: 2 queries in" in err and "onnxruntime fp32 batch 2: 2 queries in" in err
    assert "wrote " in err and "%|" not in err  # not a terminal: no bar
