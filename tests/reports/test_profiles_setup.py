"""The report's Setup section names the training profile and lists its reductions (config.json "profile")."""
from __future__ import annotations

from bakeoff.reports import setup
from bakeoff.reports.artifacts import Document, Pair
from bakeoff.reports.document import Bullets, Para, to_markdown

CPU = {"name": "cpu", "reductions": ["cnn input 112 px instead of 224 px: a quarter of the pixels",
                                     "fine-tune 3 epochs instead of 5: fine-tune epochs dominate CPU time"]}


def pair(tmp_path, name: str, profile: dict | None) -> Pair:
    family, strategy = name.split("-")
    doc = {"status": "complete", "family": family, "strategy": strategy, "backbone": {"name": "m", "label": "M"},
           "preprocess": {"img_size": 112}, "weights": {"kind": "file"}, "dataset": {"n_train_used": 10},
           "options": {"augment": False}} | ({"profile": profile} if profile is not None else {})
    return Pair(name, tmp_path / name, Document(f"{name}/config.json", doc), None, {}, [], {})


def section(tmp_path, profiles: dict[str, dict | None]) -> list:
    rows = setup.setup_rows([pair(tmp_path, n, p) for n, p in profiles.items()], None)
    return setup.blocks(rows, None)


def test_one_profile_and_its_reductions(tmp_path):
    blocks = section(tmp_path, {"cnn-probe": CPU, "cnn-ft": CPU})
    assert blocks[0] == Para("Profile: **cpu**; 2 reductions against the full profile (native input sizes, default "
                             "schedules, the whole train split):")
    assert blocks[1] == Bullets(CPU["reductions"])
    rows = setup.setup_rows([pair(tmp_path, "cnn-probe", CPU)], None)
    assert rows[0]["profile"] == {"value": CPU, "source": "cnn-probe/config.json", "field": "profile"}


def test_full_has_no_reductions_and_old_runs_say_it_was_not_recorded(tmp_path):
    assert section(tmp_path, {"cnn-probe": {"name": "full", "reductions": []}})[0] == Para(
        "Profile: **full**; no reductions against the full profile.")
    md = to_markdown(section(tmp_path, {"cnn-probe": None}))
    assert "Profile: not recorded" in md and "| **cnn-probe** |" in md  # an old config.json still has its row


def test_runs_of_different_profiles_are_listed_apart(tmp_path):
    md = to_markdown(section(tmp_path, {"cnn-probe": CPU, "cnn-ft": CPU, "clip-probe": None}))
    assert "Profile (cnn-probe, cnn-ft): **cpu**" in md and "Profile (clip-probe): not recorded" in md
    assert md.count("- fine-tune 3 epochs instead of 5") == 1
