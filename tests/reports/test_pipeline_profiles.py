"""The main job's profile, explicit options, project file, data check and --strict (reports.pipeline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bakeoff.reports import pipeline
from bakeoff.reports.pipeline import data_problem, parse, project, stages
from bakeoff.train.profiles import PROFILES, Settings


def flags_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, x in enumerate(argv) if x == flag]


def test_the_demo_without_data_and_full_with_it():
    demo = parse([])
    assert (demo.profile, demo.data, demo.runs, demo.out) == ("demo", Path("data/demo"), Path("runs/demo"),
                                                              Path("report/demo"))
    mine = parse(["--data", "data/mine", "--skip-data"])
    assert (mine.profile, mine.runs, mine.out) == ("full", Path("runs/mine"), Path("report/mine"))
    train = dict(stages(mine))["train"]()
    assert flags_after(train, "--profile") == ["full"]
    assert not {"--image-size", "--epochs", "--probe-epochs", "--cache-size", "--model"} & set(train)  # no demo values
    assert flags_after(dict(stages(parse(["--data", "d", "--profile", "cpu"])))["train"](), "--profile") == ["cpu"]


def test_explicit_options_reach_both_train_stages_and_override_the_profile():
    a = parse(["--data", "d", "--profile", "cpu", "--image-size", "clip=96", "--epochs", "4", "--cache-size", "160",
               "--max-train-images", "500"])
    steps = dict(stages(a))
    for stage in ("weights", "train"):
        argv = steps[stage]()
        assert flags_after(argv, "--image-size") == ["clip=96"] and flags_after(argv, "--epochs") == ["4"]
        assert flags_after(argv, "--cache-size") == ["160"] and flags_after(argv, "--max-train-images") == ["500"]
        assert flags_after(argv, "--profile") == ["cpu"]
    assert "--plan-weights" in steps["weights"]() and "--cache-size" not in steps["prepare"]()  # train builds it
    settings = project(a).settings
    assert settings == PROFILES["cpu"].settings.merged(Settings(image_size={"clip": 96}, epochs=4, cache_size=160,
                                                                max_train_images=500))
    assert settings.image_size == {"cnn": 112, "dinov2": 112, "clip": 96}


def test_the_project_file_records_what_the_stages_are_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "stages", lambda a: [])
    assert pipeline.main(["--weights", "random", "--weights-dir", "/w"]) == 0
    written = json.loads((tmp_path / "bakeoff.json").read_text())
    assert written | {"settings": None} == {"data": "data/demo", "runs": "runs/demo", "report": "report/demo",
                                            "profile": "demo", "settings": None, "weights": ["random"],
                                            "weights_dir": "/w"}
    assert Settings.from_dict(written["settings"]) == PROFILES["demo"].settings


def test_own_data_must_exist_only_the_demo_is_synthesised(tmp_path):
    assert data_problem(parse([])) is None
    mine = parse(["--data", str(tmp_path / "mine")])
    assert "no dataset (no manifest.csv)" in data_problem(mine) and "--profile demo" in data_problem(mine)
    assert data_problem(parse(["--data", str(tmp_path / "mine"), "--profile", "demo"])) is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "manifest.csv").write_text("id,image,tags\n")
    assert data_problem(mine) is None


@pytest.mark.parametrize("strict, code", [(False, 0), (True, 1)])
def test_strict_makes_a_failed_check_a_non_zero_exit(strict, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "stages", lambda a: [("train", lambda: ["python", "train"]),
                                                       ("export", lambda: ["python", "export"]),
                                                       ("report", lambda: ["python", "report"])])
    ran = []
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv: ran.append(argv[1]) or (argv[1] == "export"))
    assert pipeline.main(["--strict"] if strict else []) == code
    assert ran == ["train", "export", "report"]  # the chain goes on either way: the report shows the failure
