"""python -m reports.pipeline passes -v/-q (and --no-progress) on to its stages, and logs its own lines by level."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bakeoff.reports import pipeline
from bakeoff.reports.pipeline import parse, stages


def commands(tmp_path: Path, *extra: str) -> dict[str, list[str] | str]:
    a = parse(["--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
               *extra])
    return {name: build() for name, build in stages(a)}


@pytest.mark.parametrize("flag, passed", [("-q", "-q"), ("--quiet", "-q"), ("-v", "-v"), ("--verbose", "-v")])
def test_every_stage_gets_the_verbosity(tmp_path, flag, passed):
    engine = tmp_path / "runs" / "clip-ft" / "export" / "model.h200.fp16.engine"
    engine.parent.mkdir(parents=True)
    engine.write_bytes(b"engine")  # so that the TensorRT stages run too
    run = {name: argv for name, argv in commands(tmp_path, flag).items() if isinstance(argv, list)}
    assert len(run) == 13  # every stage of the chain
    for name, argv in run.items():
        assert argv.count(passed) == 1 and not {"-q", "-v"} - {passed} & set(argv), name
    assert run["bench tensorrt"][-3:] == ["--pairs", "clip-ft", passed]


def test_no_flag_passes_nothing_on(tmp_path):
    for argv in commands(tmp_path).values():
        assert not {"-q", "-v", "--quiet", "--verbose"} & set(argv if isinstance(argv, list) else [])


def test_no_progress_reaches_the_stages_with_bars(tmp_path):
    run = commands(tmp_path, "--no-progress")
    assert "--no-progress" in run["export"] and "--no-progress" in run["bench torch"]
    assert "--no-progress" not in commands(tmp_path)["export"]  # a terminal shows export's bars
    assert "--no-progress" in commands(tmp_path)["evaluate torch"]  # as before: evaluate and train never show them


def chain(monkeypatch, tmp_path) -> list[list[str]]:
    """Run the pipeline's main over three fake stages; returns the argv each subprocess got."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "_stages", lambda a: [("train", lambda: ["python", "train"]),
                                                        ("export", lambda: ["python", "export"]),
                                                        ("report", lambda: ["python", "report"])])
    ran: list[list[str]] = []
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv: ran.append(argv) or int(argv[1] == "export"))
    return ran


@pytest.mark.parametrize("flags, argv_tail", [([], []), (["-q"], ["-q"]), (["-v"], ["-v"])])
def test_the_subprocesses_get_the_flag(monkeypatch, tmp_path, flags, argv_tail):
    ran = chain(monkeypatch, tmp_path)
    assert pipeline.main(flags) == 0
    assert ran == [["python", stage, *argv_tail] for stage in ("train", "export", "report")]


def test_quiet_shows_only_what_went_wrong(monkeypatch, tmp_path, capsys):
    chain(monkeypatch, tmp_path)
    assert pipeline.main(["-q"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == ["WARNING [2/3] export: some runs failed a check (see above); recorded, continuing",
                                "WARNING checks failed in: export (see the report)"]


def test_default_and_verbose_lines(monkeypatch, tmp_path, capsys):
    chain(monkeypatch, tmp_path)
    assert pipeline.main([]) == 0
    err = capsys.readouterr().err
    assert "[1/3] train: train\n" in err and "[1/3] train: exit 0 after" in err and "pipeline done in" in err
    assert sys.executable not in err
    assert pipeline.main(["-v"]) == 0
    assert "[1/3] train: python train -v\n" in capsys.readouterr().err  # -v: the whole command line


def test_a_stage_that_fails_stops_the_chain_with_an_error(monkeypatch, tmp_path, capsys):
    ran = chain(monkeypatch, tmp_path)
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv: ran.append(argv) or 2 * (argv[1] == "export"))
    assert pipeline.main(["-q"]) == 2
    assert capsys.readouterr().err == ("error: pipeline stopped at 'export' (exit 2); fix it and rerun: finished work "
                                       "is kept\n")


def test_stage_parsers_take_the_flags_the_pipeline_passes(tmp_path):
    """The stage CLIs whose parsers can be built without running them accept the commands as the pipeline writes
    them, -q included (engines and reports build theirs in main; their flags: tests/engines, tests/common)."""
    from bakeoff.evaluate.__main__ import score_parser
    from bakeoff.export.__main__ import parser as export_parser
    from bakeoff.train.data.__main__ import parser as data_parser

    run = commands(tmp_path, "-q", "--no-progress")
    for name, p in (("export", export_parser()), ("evaluate torch", score_parser()),
                    ("evaluate onnxruntime fp16", score_parser()), ("synth", data_parser()),
                    ("prepare", data_parser())):
        args = p.parse_args(run[name][3:])
        assert args.quiet, name
