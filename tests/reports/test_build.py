"""The report built from the fabricated runs (tests/reports/conftest.py): files, table, flags, sources,
and no model code imported."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reports.__main__ import main
from reports.artifacts import ReportError, dig, ids_sha256, load_pairs
from reports.document import Bullets, Para, Table, to_html, to_markdown
from reports.figures import pareto_front
from reports.paired import comparer_for
from reports.rule import Constraints, recommend
from reports.table import main_table
from train.data.io import read_json, write_json

FIGURES = ["1_latency_vs_macro_f1.png", "2_f1_by_frequency_bucket.png", "3_per_tag_f1_vs_frequency.png",
           "4_training_time_by_phase.png", "5_deployed_vs_pytorch.png"]


@pytest.fixture(scope="module")
def report(fake_runs, tmp_path_factory):
    runs, _ = fake_runs
    out = tmp_path_factory.mktemp("report")
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text()), (out / "report.md").read_text()


def table_rows(md: str) -> dict[str, list[str]]:
    """Main-table rows of report.md by pair: its cells."""
    rows = {}
    for line in md.splitlines():
        m = re.match(r"\| \*\*([\w-]+)\*\*", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip("|").split(" | ")]
    return rows


def note(md: str, mark: str) -> str:
    return next(line for line in md.splitlines() if line.startswith(mark + " "))


def test_writes_every_file_and_a_self_contained_html(report):
    out, summary, md = report
    assert sorted(p.name for p in (out / "figures").iterdir()) == FIGURES
    assert all(f"](figures/{f})" in md for f in FIGURES)
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 5 and 'src="figures' not in html and "http" not in html
    assert [f["file"] for f in summary["figures"]] == [f"figures/{f}" for f in FIGURES]
    assert summary["recommendation"]["chosen"] == "dinov2-ft"
    assert "**Recommended: dinov2-ft**" in md and "<strong>Recommended: dinov2-ft</strong>" in html


def test_table_has_every_pair_with_flags_and_dashes_for_missing_artifacts(report):
    _, _, md = report
    rows = table_rows(md)
    header = next(line for line in md.splitlines() if line.startswith("| Pair"))
    col = {h.strip(): i for i, h in enumerate(header.strip("|").split(" | "))}
    assert list(rows) == ["dinov2-ft", "clip-probe", "clip-ft", "dinov2-probe", "cnn-ft", "cnn-probe"]  # best first
    assert "random init" in rows["cnn-probe"][0] and "random init" not in rows["cnn-ft"][0]
    torch_cell = rows["cnn-ft"][col["PyTorch latency"]]
    assert torch_cell[0] == "—"
    assert "cnn-ft" in note(md, torch_cell[1:]) and "not benchmarked" in note(md, torch_cell[1:])
    cpu = rows["dinov2-ft"][col["PyTorch latency"]]
    assert cpu.startswith("fp32: 80 / 160 ms") and "not a T4" in note(md, cpu.split("ms")[1][0])
    assert rows["clip-probe"][col["TensorRT latency"]].startswith("fp16: 1.5 / 3 ms<br>")  # on a T4: no mark
    estimate = rows["dinov2-probe"][col["TensorRT latency"]]
    assert estimate.startswith("fp16: ≈ ") and "T4 ESTIMATE" in note(md, estimate.split("ms")[1][0])
    assert "ONNX Runtime fp16: FAILED" in rows["cnn-ft"][col["FP16 / engine Δ macro-F1"]]
    assert "export parity FAILED" in rows["dinov2-ft"][col["FP16 / engine Δ macro-F1"]]
    assert "export parity passed" in rows["clip-ft"][col["FP16 / engine Δ macro-F1"]]


def test_every_number_traces_to_its_artifact(report, fake_runs):
    runs, _ = fake_runs
    _, summary, md = report
    for pair, values in summary["table"]["pairs"].items():
        for key in ("macro_f1", "tail_f1", "map"):
            v = values[key]
            assert v["source"] == f"{pair}/eval/torch/metrics.json"
            assert dig(read_json(runs / v["source"]), v["field"]) == v["value"]
        for lat in values["latency"].values():
            for entry in lat.values():
                p99 = entry["p99_ms_batch1"]
                assert dig(read_json(runs / p99["source"]), p99["field"]) == p99["value"]
    sources = set()

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("source"), str) and "field" in x:
                sources.update(x["source"].split(" − "))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(summary)
    assert len(sources) > 30 and all((runs / s).is_file() for s in sources), sorted(s for s in sources
                                                                                   if not (runs / s).is_file())
    assert f"{summary['table']['pairs']['dinov2-ft']['macro_f1']['value']:.3f}" in md


def test_long_tail_section_and_provenance(report):
    _, summary, md = report
    tail = summary["long_tail"]
    assert len(tail["backbones"]) == 6 and len(tail["finetune"]) == 3 and len(tail["disagreements"]) == 10
    verdicts = {c["family"]: c["result"]["separated"] for c in tail["finetune"]}
    assert verdicts["dinov2"] is True and verdicts["clip"] is False
    assert "DINOv2: fine-tuning **helps** the tail" in md and "CLIP: fine-tuning has **no clear effect**" in md
    prov = summary["provenance"]
    (dataset,) = prov["datasets"]
    assert dataset["split_seed"] == 0 and dataset["n_images"] == 600 and dataset["split_sizes"]["test"] == 150
    assert {(w["family"], w["kind"]) for w in prov["weights"]} == {("cnn", "random"), ("cnn", "file"),
                                                                   ("dinov2", "file"), ("clip", "file")}
    assert "Tesla T4" in prov["devices"]["latency"] and dataset["hash"] in md


def test_incomplete_runs_and_other_datasets(fake_runs, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(fake_runs[0], runs)
    cfg = read_json(runs / "clip-ft" / "config.json")
    write_json(runs / "clip-ft" / "config.json", cfg | {"status": "running"})
    pairs = load_pairs(runs)
    table, _ = main_table(pairs)
    row = next(r for r in table.rows if r[0][0] == "**clip-ft**")
    assert row[1].startswith("—") and any("training incomplete" in n and "clip-ft" in n for n in table.notes)
    comparer = comparer_for([p.reference for p in pairs if p.reference is not None], str(fake_runs[1]))
    r = recommend(pairs, Constraints(), comparer)
    assert "clip-ft" not in r["considered"] and "training incomplete" in r["not_considered"][0]["reason"]
    metrics = runs / "cnn-ft" / "eval" / "torch" / "metrics.json"
    write_json(metrics, read_json(metrics) | {"dataset": {"path": "elsewhere", "hash": "f" * 64}})
    with pytest.raises(ReportError, match="different datasets"):
        comparer_for([p.reference for p in load_pairs(runs) if p.reference is not None], None)


def test_reports_imports_no_model_code():
    code = ("import pkgutil, importlib, sys, reports\n"
            "for m in pkgutil.iter_modules(reports.__path__):\n"
            "    if m.name != 'pipeline': importlib.import_module('reports.' + m.name)\n"
            "print([m for m in ('torch', 'timm', 'open_clip', 'onnx', 'onnxruntime', 'tensorrt', 'train.registry')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ids_hash_matches_evaluate():
    from evaluate.score import ids_sha256 as evaluate_ids_sha256

    assert ids_sha256(["a", "b", "c"]) == evaluate_ids_sha256(["a", "b", "c"])


def test_pareto_front():
    points = [(10.0, 0.5), (1.0, 0.3), (5.0, 0.3), (2.0, 0.45), (20.0, 0.49), (1.0, 0.2)]
    assert pareto_front(points) == [1, 3, 0]


def test_document_renders_tables_and_bold(tmp_path):
    blocks = [Para("a **b** <c>"), Bullets(["x"]), Table(["h|1", "h2"], [["1|2", ["l1", "l2"]]], ["n¹ note"])]
    md = to_markdown(blocks)
    assert "| h\\|1 | h2 |" in md and "| 1\\|2 | l1<br>l2 |" in md and "n¹ note" in md
    html = to_html(blocks, "t")
    assert "<p>a <strong>b</strong> &lt;c&gt;</p>" in html and "<span>l1</span><br><span>l2</span>" in html
