"""bakeoff.reports.ablation: the ablation.json of the tiny cnn-probe run as report blocks (one table per backbone, the
verdict wording), stale and missing ablations said so, and the section's module free of model code."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bakeoff.common.io import read_json, write_json
from bakeoff.reports import ablation as R
from bakeoff.reports.artifacts import load_pairs
from bakeoff.reports.document import Para, Table, to_html, to_markdown


@pytest.fixture(scope="module")
def runs(tiny_runs, tiny_data, tmp_path_factory):
    from bakeoff.evaluate.ablation import ablate_all

    out = tmp_path_factory.mktemp("ablation-report")
    for pair in ("cnn-probe", "cnn-ft"):
        shutil.copytree(tiny_runs / pair, out / pair, ignore=shutil.ignore_patterns("eval"))
    for d in (tiny_runs / ".cache").glob("features-*"):
        shutil.copytree(d, out / ".cache" / d.name)
    ablate_all(out, tiny_data, device="cpu", log=lambda s: None)
    return out


def test_one_table_per_backbone_with_every_variant(runs):
    doc = read_json(runs / "cnn-probe" / "eval" / R.ABLATION)
    analysis = R.analyse(load_pairs(runs))
    assert [b["pair"] for b in analysis["backbones"]] == ["cnn-probe"] and analysis["missing"] == []
    blocks = R.blocks(analysis)
    tables = [b for b in blocks if isinstance(b, Table)]
    assert len(tables) == 1
    table = tables[0]
    assert table.header[:4] == ["method", "test macro-F1 [95% CI]", "Δ vs baseline [95% CI]", "verdict"]
    rows = {r[0]: r for r in table.rows}
    assert list(rows) == list(doc["variants"])
    assert rows["baseline"][2] == "—" and rows["baseline"][3] == "(baseline)"
    for name, v in doc["variants"].items():
        if name == "baseline":
            continue
        for metric, col in (("macro_f1", 3), ("tail_f1", 6)):
            verdict = v["test"][metric]["vs_baseline"]["verdict"]
            assert rows[name][col].strip("*") == verdict
        assert f"{v['selected']['weight_decay']:g}" in rows[name][-1]
    assert table.header[7] == "validation long-tail F1 ± SE"
    for name, v in doc["variants"].items():  # the validation score the re-sampling choice is made on
        val = v["validation"]
        assert rows[name][7] == f"{val['tail_f1_crossfit']:.3f} ± {val['tail_f1_crossfit_se']:.3f}"
    (chosen,) = [n for n in table.notes if n.startswith("Re-sampling chosen on validation")]
    for c in doc["rebalance_on_validation"]["choices"]:
        assert f"{c['with']} vs {c['without']}, validation long-tail F1 " in chosen and f"**{c['choice']}**" in chosen
    assert any(n == "Source: cnn-probe/eval/ablation.json." for n in table.notes)
    assert any(n.startswith("field+la+shrink is the run's own configuration") for n in table.notes)
    md = to_markdown(blocks)
    assert "random init" in md and "helps** only when the CI" in md
    assert "<table>" in to_html(blocks, "t")


def test_verdict_wording(runs, tmp_path):
    """A method whose CI lies above 0 helps, below 0 hurts, across 0 does not help; the summary line says which."""
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    path = copy / "cnn-probe" / "eval" / R.ABLATION
    doc = read_json(path)
    fixed = {"asl": ([0.01, 0.03], "helps"), "balanced": ([-0.03, -0.01], "hurts")}
    for name in doc["variants"]:
        if name == "baseline":
            continue
        ci, verdict = fixed.get(name, ([-0.01, 0.01], "does not help"))
        for metric in ("macro_f1", "tail_f1"):
            doc["variants"][name]["test"][metric]["vs_baseline"] |= {"delta": sum(ci) / 2, "ci": ci, "verdict": verdict}
    write_json(path, doc)
    blocks = R.blocks(R.analyse(load_pairs(copy)))
    rows = {r[0]: r for r in next(b for b in blocks if isinstance(b, Table)).rows}
    assert rows["asl"][1:4] == [rows["asl"][1], "+0.020 [+0.010, +0.030]", "**helps**"]
    assert rows["balanced"][3] == "**hurts**" and rows["shrink"][3] == "does not help"
    lead = next(b.text for b in blocks if isinstance(b, Para) and b.text.startswith("**CNN"))
    assert "Helps: asl (overall, tail)." in lead and "Hurts: balanced (overall, tail)" in lead


def test_stale_or_missing_ablation_is_said_not_shown(runs, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    model = copy / "cnn-probe" / "model.safetensors"
    state = load_file(str(model))
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(model))  # retrained after the ablation
    analysis = R.analyse(load_pairs(copy))
    assert analysis["backbones"] == [] and "stale" in analysis["missing"][0]["reason"]
    (blocks,) = R.blocks(analysis)
    assert isinstance(blocks, Para) and "--force" in blocks.text
    (copy / "cnn-probe" / "eval" / R.ABLATION).unlink()
    (blocks,) = R.blocks(R.analyse(load_pairs(copy)))
    assert "python -m evaluate.ablation" in blocks.text and "cnn-probe" in blocks.text


def test_no_model_code_imported():
    code = "import sys, reports.ablation; print([m for m in ('torch', 'timm', 'open_clip') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
