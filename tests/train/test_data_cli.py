"""python -m train.data: every flag documented, columns detected and reported, progress bars that can be turned off."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from bakeoff.train.data import images
from bakeoff.train.data.__main__ import main, parser
from bakeoff.train.data.dataset import load_dataset


def _parsers(p: argparse.ArgumentParser):
    """``p`` and every subcommand's parser below it."""
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_flag_and_subcommand_has_help():
    undocumented = [
        f"{p.prog}: {'/'.join(a.option_strings) or a.dest}"
        for p in _parsers(parser())
        for a in p._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    undocumented += [
        f"{p.prog}: subcommand {c.dest}"
        for p in _parsers(parser())
        for a in p._actions
        if isinstance(a, argparse._SubParsersAction)
        for c in a._choices_actions
        if not (c.help or "").strip()
    ]
    assert undocumented == []


def _catalog(tmp: Path, header: str = "id,image,tags") -> tuple[Path, Path]:
    img = tmp / "img"
    img.mkdir()
    for i in (1, 2):
        Image.effect_noise((16, 16), 64).convert("RGB").save(img / f"{i}.png")
    src = tmp / "labels.csv"
    src.write_text(f"{header}\n1,1.png,top|blue\n2,2.png,top\n")
    return src, img


def test_import_csv_detects_columns_and_says_which(tmp_path, capsys, monkeypatch):
    src, img = _catalog(tmp_path)
    out = tmp_path / "ds"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress bars show on a terminal only
    assert main(["import", "csv", str(src), "--image-root", str(img), "--out", str(out), "--workers", "1"]) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout == ""  # status lines go to stderr, with the bar
    assert stderr.startswith("columns: id 'id' (detected), image 'image' (detected), tags 'tags' (detected)\n")
    assert "imported 2 of 2 rows" in stderr
    assert "verify images: 100%" in stderr and "2/2" in stderr
    assert load_dataset(out).tags == [["top", "blue"], ["top"]]


def test_no_progress_hides_the_bars(tmp_path, capsys, monkeypatch):
    src, img = _catalog(tmp_path)
    out = tmp_path / "ds"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["import", "csv", str(src), "--image-root", str(img), "--out", str(out), "--no-progress"]) == 0
    assert main(["cache", str(out), "--size", "8", "--workers", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "imported 2 of 2 rows" in err and "%|" not in err and "\r" not in err  # status lines, no bar
    assert main(["import", "csv", str(src), "--image-root", str(img), "--out", str(tmp_path / "ds2"), "-q"]) == 0
    assert main(["cache", str(out), "--size", "16", "--workers", "1", "-q"]) == 0
    assert capsys.readouterr().err == ""  # -q: neither status lines nor bars


def test_ambiguous_columns_fail_with_the_flag_to_pass(tmp_path, capsys):
    src, img = _catalog(tmp_path, header="id,image,tags")
    src.write_text("id,image,path,tags\n1,1.png,1.png,top\n")
    argv = ["import", "csv", str(src), "--image-root", str(img), "--out", str(tmp_path / "ds"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {src}: ambiguous image column (candidates: image, path)" in err
    assert "the header has: id, image, path, tags" in err and "pass --image-column NAME" in err
    assert main([*argv, "--image-column", "path"]) == 0
    assert "image 'path', tags 'tags' (detected)" in capsys.readouterr().err


def test_check_images_progress_bar_in_two_processes(tmp_path, capsys):
    good = tmp_path / "a.png"
    Image.effect_noise((8, 8), 64).convert("RGB").save(good)
    paths = [str(good), str(tmp_path / "missing.png")] * 3
    assert images.check_images(paths, workers=2, progress=True) == images.check_images(paths, workers=2)
    assert capsys.readouterr().err.count("verify images: 100%") == 1
