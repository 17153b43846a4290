"""Fixtures of the export tests: the export CLI run once over a copy of the tiny cnn-probe run."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from bakeoff.export.__main__ import main


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``python -m export ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def cnn_export(tiny_runs, tmp_path_factory):
    """``python -m export --fp16`` over a copy of the tiny cnn-probe run: (exit code, stdout, stderr, run dir)."""
    runs = tmp_path_factory.mktemp("export") / "runs"
    shutil.copytree(tiny_runs / "cnn-probe", runs / "cnn-probe")
    (runs / "half-done").mkdir()
    (runs / "half-done" / "config.json").write_text(json.dumps({"status": "running"}))
    return (*run_cli("--fp16", "--runs", str(runs), "--pairs", "cnn-probe", "half-done"), runs / "cnn-probe")
