"""The project file ./bakeoff.json: its round trip, when it applies, and the stage commands typed after the main
job (the design card's) using it for their defaults."""
import json

import pytest

from bakeoff.reports.pipeline import parse, project, stages
from bakeoff.train.profiles import Settings
from bakeoff.train.project import PROJECT_FILE, Project, ProjectError, project_for, read_project, write_project
from tests.conftest import TINY_MODELS


def test_round_trip(tmp_path):
    p = Project("data/x", "runs/x", "report/x", "cpu", Settings(model={"cnn": "efficientnet_lite0"},
                                                                 image_size={"clip": 128}, epochs=3),
                ["auto"], "/w")
    write_project(p, tmp_path / "bakeoff.json")
    assert read_project(tmp_path / "bakeoff.json") == p
    assert json.loads((tmp_path / "bakeoff.json").read_text())["settings"]["image_size"] == {"clip": 128}
    assert read_project(tmp_path / "absent.json") is None


@pytest.mark.parametrize("content", ["{not json", '{"data": "d"}', '{"data": "d", "runs": "r", "report": "o", '
                                                                    '"profile": "huge"}'])
def test_an_unusable_project_file_is_an_error_that_says_so(tmp_path, content):
    (tmp_path / "bakeoff.json").write_text(content)
    with pytest.raises(ProjectError, match="bakeoff.json"):
        read_project(tmp_path / "bakeoff.json")


def test_the_project_applies_only_where_a_command_agrees_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_project(Project("data/a", "runs/a", "report/a"))
    assert project_for({"data": None, "runs": None}) is not None
    assert project_for({"data": "data/a", "runs": str(tmp_path / "runs" / "a")}) is not None  # the same paths
    assert project_for({"data": None, "runs": "runs/b"}) is None  # never runs/b with data/a's dataset


COMMANDS = {  # module -> (argv, what the error names)
    "export": (["--fp16"], "--runs is required (the runs directory)"),
    "evaluate": ([], "--runs is required (the runs directory)"),
    "engines": (["bench"], "--runs is required (the runs directory)"),
    "reports": ([], "--runs is required (the runs directory)"),
}


@pytest.mark.parametrize("module", COMMANDS)
def test_without_a_project_file_a_stage_says_what_to_pass(module, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    argv, message = COMMANDS[module]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"{module}.__main__").main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "python -m reports.pipeline" in err and str(PROJECT_FILE) in err


def test_train_without_a_project_file_or_data_says_what_to_pass(tmp_path, monkeypatch):
    from bakeoff.train.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"--data is required \(the dataset directory\).*reports.pipeline"):
        main(["--backbone", "clip", "--strategy", "ft", "--weights", "random"])


def main_job(tiny_data, tmp_path) -> tuple:
    """The main job's options on the tiny dataset: (parsed pipeline args, its train stage's argv)."""
    flags = [x for fam, (name, px) in TINY_MODELS.items()
             for x in ("--model", f"{fam}={name}", "--image-size", f"{fam}={px}")]
    a = parse(["--data", str(tiny_data), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report"),
               "--profile", "full", "--weights", "random", "--epochs", "1", "--probe-epochs", "2", *flags])
    return a, dict(stages(a))["train"]()


@pytest.mark.slow
def test_card_commands_work_as_typed_after_the_main_job(tiny_data, tmp_path, monkeypatch, capsys):
    from bakeoff.evaluate.__main__ import main as evaluate
    from bakeoff.reports.__main__ import main as report
    from bakeoff.train.__main__ import main as train

    monkeypatch.chdir(tmp_path)
    a, stage = main_job(tiny_data, tmp_path)
    write_project(project(a))  # as python -m reports.pipeline does first
    one_pair = stage[stage.index("bakeoff.train") + 1:]
    one_pair[one_pair.index("--all")] = "--backbone=cnn"
    assert train(one_pair + ["--strategy", "probe"]) == 0  # the main job's train stage, for one pair
    capsys.readouterr()

    assert train(["--backbone", "cnn", "--strategy", "probe"]) == 0  # the card's command, as typed
    out, err = capsys.readouterr()
    assert "cnn-probe: current, nothing to do" in err and "defaults from ./bakeoff.json" in err
    assert train(["--backbone", "cnn", "--strategy", "probe", "--image-size", "24"]) == 0
    assert "options changed (image_size 32 -> 24)" in capsys.readouterr().err  # explicit flags override the file

    assert evaluate([]) == 0
    assert (tmp_path / "runs" / "cnn-probe" / "eval" / "torch" / "metrics.json").is_file()
    assert evaluate(["compare"]) == 0 and "cnn-probe" in capsys.readouterr().out
    assert report([]) == 0 and (tmp_path / "report" / "report.html").is_file()
