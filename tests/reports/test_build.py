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

from reports import fmt
from reports.__main__ import main
from reports.artifacts import ReportError, dig, ids_sha256, load_pairs
from reports.build import training_rows
from reports.document import Bullets, Para, Table, to_html, to_markdown
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


def notes(md: str, marked: str) -> list[str]:
    """The footnotes of report.md whose marks end ``marked`` (a value and its comma-separated marks)."""
    marks = re.search(r"[⁰¹²³⁴⁵⁶⁷⁸⁹,]+$", marked).group().split(",")
    return [next(line for line in md.splitlines() if line.startswith(m + " ")) for m in marks]


def col_training(md: str) -> int:
    header = next(line for line in md.splitlines() if line.startswith("| Pair"))
    return [h.strip() for h in header.strip("|").split(" | ")].index("Training time")


def line_with(cell: str, start: str) -> str:
    """The line of a table cell that starts with ``start``."""
    return next(line for line in cell.split("<br>") if line.startswith(start))


def test_writes_every_file_and_a_self_contained_html(report):
    out, summary, md = report
    assert sorted(p.name for p in (out / "figures").iterdir()) == FIGURES
    assert all(f"](figures/{f})" in md for f in FIGURES)
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 5 and 'src="figures' not in html and "http" not in html
    assert [f["file"] for f in summary["figures"]] == [f"figures/{f}" for f in FIGURES]
    assert ("Not drawn, because their runtime's evaluation failed: cnn-probe on ONNX Runtime fp16."
            in summary["figures"][0]["caption"])
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
    (gap,) = notes(md, torch_cell)
    assert "cnn-ft" in gap and "PyTorch: not benchmarked" in gap
    cpu = rows["dinov2-ft"][col["PyTorch latency"]]
    assert cpu.startswith("fp32: 80 / 160 ms")
    where, what = notes(md, line_with(cpu, "fp32"))
    assert "not a T4: " in where and what.split(" ", 1)[1].startswith("latency = host wall time of one predict call")
    on_t4 = line_with(rows["clip-probe"][col["TensorRT latency"]], "fp16")
    assert on_t4.startswith("fp16: 1.5 / 3 ms")  # on a T4: only what its latency measures is noted
    assert [n.split(" ", 1)[1] for n in notes(md, on_t4)] == [
        "latency = H2D + GPU compute + D2H per query (CUDA events): clip-probe."]
    estimate = rows["dinov2-probe"][col["TensorRT latency"]]
    assert estimate.startswith("fp16: ≈ ") and "T4 ESTIMATE" in notes(md, line_with(estimate, "fp16"))[0]
    deployed = {pair: cells[col["FP16 / engine Δ macro-F1"]] for pair, cells in rows.items()}
    assert "ONNX Runtime fp16: FAILED" in deployed["cnn-ft"]
    assert "export parity FAILED" in deployed["dinov2-ft"] and "export parity passed" in deployed["clip-ft"]
    assert re.search(r"TensorRT fp16: [+−]0\.\d{4}", deployed["clip-probe"])
    (unevaluated,) = notes(md, line_with(deployed["dinov2-ft"], "ONNX Runtime fp16: not evaluated"))
    assert unevaluated.endswith(" model.fp16.onnx was exported but not evaluated (no eval/onnxruntime-fp16/): "
                                "dinov2-ft, clip-ft.")


def test_training_time_is_the_sum_of_phases_in_table_figure_and_rule(report, fake_runs):
    runs, _ = fake_runs
    _, summary, md = report
    rows = table_rows(md)
    training = summary["table"]["pairs"]["dinov2-probe"]["training"]
    assert training["training_seconds"]["value"] == pytest.approx(90)  # its timing.json total says 31.5
    assert read_json(runs / "dinov2-probe/timing.json")["seconds"]["total"] == pytest.approx(31.5)
    stale, reused = notes(md, line_with(rows["dinov2-probe"][col_training(md)], "90 s total"))
    assert "written before the fix" in stale and "dinov2-probe" in stale and "reused cache" in reused
    ft = rows["dinov2-ft"][col_training(md)]
    assert ft.startswith("6.7 min total<br>with probe 8.2 min")
    assert "LP-then-FT" in notes(md, line_with(ft, "with probe 8.2 min"))[0]
    assert summary["table"]["pairs"]["dinov2-ft"]["training"]["cost_seconds"]["value"] == pytest.approx(490)
    bars = {r["pair"]: sum(r["phases"].values()) for r in training_rows(load_pairs(runs))}
    assert bars == {p: pytest.approx(v["training"]["training_seconds"]["value"])
                    for p, v in summary["table"]["pairs"].items()}


def test_markdown_footnotes_are_separate_paragraphs(report):
    _, _, md = report
    assert "\n\n¹ " in md and "\n\n² " in md and "\n¹ " not in md.replace("\n\n¹ ", "")


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
                sources.update(re.split(" [−+] ", x["source"]))
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(summary)
    assert len(sources) > 30 and all((runs / s).is_file() for s in sources), sorted(s for s in sources
                                                                                   if not (runs / s).is_file())
    assert f"{summary['table']['pairs']['dinov2-ft']['macro_f1']['value']:.3f}" in md
    deltas = 0
    for pair, values in summary["table"]["pairs"].items():
        for name, d in values["deployed_delta"].items():
            if name not in ("parity", "not_evaluated") and "value" in d:  # a scored evaluation's difference
                ev, ref = (read_json(runs / s) for s in d["source"].split(" − "))
                assert d["value"] == ev["macro_f1"] - ref["macro_f1"]
                assert fmt.signed(d["value"], 4) in md
                deltas += 1
        phases = read_json(runs / pair / "timing.json")["seconds"]
        assert values["training"]["training_seconds"]["value"] == pytest.approx(
            sum(v for k, v in phases.items() if k != "total"))
    for point in summary["latency_vs_macro_f1_points"]:
        latency, accuracy = (read_json(runs / s) for s in point["sources"])
        if point["accuracy"] != "failed":
            assert point["macro_f1"] == accuracy["macro_f1"]
        if not point["estimate"]:
            assert point["latency_ms"] == latency["batches"][0]["latency_ms"]["p99"]
    assert deltas == 4
    chosen = summary["recommendation"]
    assert f"{read_json(runs / chosen['chosen_eval'])['macro_f1']:.3f}" in chosen["text"][0]


def test_long_tail_section_and_provenance(report):
    _, summary, md = report
    tail = summary["long_tail"]
    assert len(tail["backbones"]) == 6 and len(tail["finetune"]) == 3 and len(tail["disagreements"]) == 10
    verdicts = {c["family"]: c["result"]["separated"] for c in tail["finetune"]}
    assert verdicts["dinov2"] is True and verdicts["clip"] is False
    assert "DINOv2: fine-tuning **helps** the tail" in md and "CLIP: fine-tuning has **no clear effect**" in md
    # the random-init cnn-probe: marked in comparisons, its fine-tuning sentence flagged, left out of the spread
    assert "| linear probe | cnn-probe (random init) − dinov2-probe |" in md
    cnn = next(line for line in md.splitlines() if line.startswith("- CNN: "))
    assert "cnn-ft − cnn-probe (random init)" in cnn and cnn.endswith("says nothing about fine-tuning the pretrained "
                                                                       "backbone.")
    assert tail["left_out_of_disagreements"] == ["cnn-probe"]
    assert all("cnn-probe" not in r["f1"] for r in tail["disagreements"])
    assert "random-init pairs (cnn-probe) are left out of the spread" in md
    prov = summary["provenance"]
    (dataset,) = prov["datasets"]
    assert dataset["split_seed"] == 0 and dataset["n_images"] == 600 and dataset["split_sizes"]["test"] == 150
    assert {(w["family"], w["kind"]) for w in prov["weights"]} == {("cnn", "random"), ("cnn", "file"),
                                                                   ("dinov2", "file"), ("clip", "file")}
    assert "Tesla T4" in prov["devices"]["latency"] and dataset["hash"] in md
    assert re.search(r"torch 2\.14\.1 \([a-z/-]*training-time\)", md) and "9.9 (benchmark-time)" in md
    assert re.search(r"timm [\d.]+ \(evaluation-time\), 0\.9\.16 \(training-time\)", md)


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


def test_document_renders_tables_and_bold(tmp_path):
    blocks = [Para("a **b** <c>"), Bullets(["x"]), Table(["h|1", "h2"], [["1|2", ["l1", "l2"]]], ["n¹ note"])]
    md = to_markdown(blocks)
    assert "| h\\|1 | h2 |" in md and "| 1\\|2 | l1<br>l2 |" in md and "n¹ note" in md
    html = to_html(blocks, "t")
    assert "<p>a <strong>b</strong> &lt;c&gt;</p>" in html and "<span>l1</span><br><span>l2</span>" in html
