"""The report built from the fabricated runs (tests/reports/conftest.py): files, table, flags, sources,
and no model code imported."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bakeoff.common.io import read_json, write_json
from bakeoff.reports import fmt
from bakeoff.reports.__main__ import main
from bakeoff.reports.artifacts import ReportError, dig, ids_sha256, load_pairs
from bakeoff.reports.build import training_rows
from bakeoff.reports.document import Bullets, Para, Table, to_html, to_markdown
from bakeoff.reports.paired import comparer_for
from bakeoff.reports.rule import Constraints, recommend
from bakeoff.reports.table import main_table

FIGURES = ["1_latency_vs_macro_f1.png", "2_f1_by_frequency_bucket.png", "3_per_tag_f1_vs_frequency.png",
           "4_training_time_by_phase.png", "5_deployed_vs_pytorch.png"]


@pytest.fixture(scope="module")
def report(fake_runs, tmp_path_factory):
    runs, _ = fake_runs
    out = tmp_path_factory.mktemp("report")
    assert main(["--runs", str(runs), "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text()), (out / "report.md").read_text()


def table_rows(md: str, first_column: str = "Macro-F1 [95% CI]") -> dict[str, list[str]]:
    """Rows by pair of the report.md table whose second column is ``first_column`` (default: the main table)."""
    table = md.split(f"| Pair | {first_column} |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\| \*\*([\w-]+)\*\*", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in line.strip("|").split(" | ")]
    return rows


def notes(md: str, marked: str) -> list[str]:
    """The footnotes of report.md whose marks end ``marked`` (a value and its comma-separated marks)."""
    marks = re.search(r"[⁰¹²³⁴⁵⁶⁷⁸⁹,]+$", marked).group().split(",")
    return [next(line for line in md.splitlines() if line.startswith(m + " ")) for m in marks]


def columns(md: str) -> dict[str, int]:
    """The main table's column positions by header."""
    header = next(line for line in md.splitlines() if line.startswith("| Pair | Macro-F1"))
    return {h.strip(): i for i, h in enumerate(header.strip("|").split(" | "))}


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
    col = columns(md)
    assert list(rows) == ["dinov2-ft", "clip-probe", "clip-ft", "dinov2-probe", "cnn-ft", "cnn-probe"]  # best first
    assert "random init" in rows["cnn-probe"][0] and "random init" not in rows["cnn-ft"][0]
    torch_cell = rows["cnn-ft"][col["PyTorch latency"]]
    assert torch_cell[0] == "—"
    (gap,) = notes(md, torch_cell)
    assert "cnn-ft" in gap and "PyTorch: not benchmarked" in gap
    cpu = rows["dinov2-ft"][col["PyTorch latency"]]
    assert cpu.startswith("fp32: 80 / 160 ms")
    where, what, busy = notes(md, line_with(cpu, "fp32"))  # another process used the cores during this one
    assert "not a T4: " in where and what.split(" ", 1)[1].startswith("latency = host wall time of one predict call")
    assert "other processes used the CPU during the benchmark" in busy and busy.endswith(": dinov2-ft.")
    assert len(notes(md, line_with(rows["dinov2-probe"][col["PyTorch latency"]], "fp32"))) == 2  # this one ran alone
    trt = col["TensorRT latency (measured, or T4 ESTIMATE)"]  # the header says estimates may stand in
    on_t4 = line_with(rows["clip-probe"][trt], "fp16")
    assert on_t4.startswith("fp16: 1.5 / 3 ms")  # on a T4: only what its latency measures is noted
    assert [n.split(" ", 1)[1] for n in notes(md, on_t4)] == [
        "latency = H2D + GPU compute + D2H per query (CUDA events): clip-probe."]
    estimate = line_with(rows["dinov2-probe"][trt], "T4 ESTIMATE ≈ ")  # the cell itself says it is an estimate
    assert re.match(r"T4 ESTIMATE ≈ [\d.]+ ms[¹²³⁴⁵⁶⁷⁸⁹]", estimate) and "roofline" in notes(md, estimate)[0]
    deployed = {pair: cells[col["FP16 / engine Δ macro-F1"]] for pair, cells in rows.items()}
    assert "ONNX Runtime fp16: FAILED" in deployed["cnn-ft"]
    assert "export parity FAILED: ONNX Runtime fp32 (" in deployed["dinov2-ft"]
    assert re.search(r"TensorRT fp16: [+−]0\.\d{4}", deployed["clip-probe"])
    (unevaluated,) = notes(md, line_with(deployed["dinov2-ft"], "ONNX Runtime fp16: not evaluated"))
    assert unevaluated.endswith(" model.fp16.onnx was exported but not evaluated (no eval/onnxruntime-fp16/): "
                                "dinov2-ft.")


def test_parity_and_tolerance_in_the_deployed_column(report, fake_runs):
    runs, _ = fake_runs
    _, summary, md = report
    deployed = {pair: cells[columns(md)["FP16 / engine Δ macro-F1"]] for pair, cells in table_rows(md).items()}
    # the worst graph's decision flips, as counts from parity.json, never a rounded rate behind "≤"
    worst = max(read_json(runs / "clip-ft/export/parity.json")["results"].values(), key=lambda r: r["flip_rate"])
    rate = f"{100 * worst['flips'] / worst['decisions']:.2g}%, " if worst["flips"] else ""
    assert (f"export parity passed on 150 images: at worst {worst['flips']:,} of {worst['decisions']:,} decisions "
            f"flipped ({rate}ONNX Runtime") in deployed["clip-ft"] and "≤" not in md
    parity = summary["table"]["pairs"]["clip-ft"]["deployed_delta"]["parity"]
    assert parity["worst"]["flips"] == worst["flips"] and isinstance(parity["worst"]["decisions"], int)
    # an evaluation outside the export tolerance is marked in its cell; one whose export failed parity says so
    fp16 = summary["table"]["pairs"]["clip-ft"]["deployed_delta"]["onnxruntime-fp16"]
    assert fp16["value"] < -0.005 and fp16["outside_tolerance"] == 0.005
    assert f"ONNX Runtime fp16: {fmt.signed(fp16['value'], 4)} ⚠ outside ±0.005" in deployed["clip-ft"]
    assert "ONNX Runtime fp32: +0.0000 (export FAILED parity)" in deployed["dinov2-ft"]
    assert "⚠" not in deployed["dinov2-ft"] and "±0.002 fp32, ±0.005 fp16 / bf16" in md


def test_setup_section_says_what_each_run_trained(report):
    _, summary, md = report
    assert md.index("## Setup") < md.index("## Recommendation")
    rows = table_rows(md, "Model")
    assert list(rows) == ["cnn-probe", "cnn-ft", "dinov2-probe", "dinov2-ft", "clip-probe", "clip-ft"]
    pair, model, size, weights, images, head, schedule, augment = rows["dinov2-ft"]
    assert pair == "**dinov2-ft**" and model == "DINOV2<br>dinov2_model (timm)" and size.startswith("224 px<br>")
    assert weights == "pretrained (local file)" and head.startswith("sigmoid per tag")  # a config from before heads
    assert images == "240 of 360 (67%)" and augment == "off" and rows["clip-ft"][7] == "online: flip + shift"
    budget = "budget not recorded (trained before tuning budgets were)"
    assert schedule == ("fine-tune: 3 epochs, from the linear probe's head<br>best epoch 3 = last: may be "
                        f"under-trained<br>{budget}")
    assert rows["clip-ft"][6].endswith(f"best epoch 2 of 3<br>{budget}")  # its best epoch is not its last
    assert rows["cnn-ft"][6].endswith(f"best epoch: — (no history.jsonl)<br>{budget}")
    assert rows["cnn-probe"][3] == "random init"
    assert rows["cnn-probe"][6] == ("linear probe: 4 settings × 10 epochs<br>selected at epoch 10 = last: "
                                    f"may be under-trained<br>{budget}")
    assert rows["clip-probe"][6].endswith(f"selected at epoch 7 of 10<br>{budget}")
    dinov2_ft = next(r for r in summary["setup"]["rows"] if r["pair"] == "dinov2-ft")
    assert dinov2_ft["schedule"]["best_epoch"] | {"source": None} == {
        "value": 3, "last_epoch": 3, "source": None, "field": "epoch of the highest val_map"}
    assert dinov2_ft["schedule"]["best_epoch"]["source"] == "dinov2-ft/history.jsonl"
    assert dinov2_ft["train_images"] == {"value": 240, "source": "dinov2-ft/config.json",
                                         "field": "dataset.n_train_used"}


def test_a_training_subset_is_said_wherever_training_image_counts_appear(report):
    _, summary, md = report
    said = "Training-image counts are the whole train split's (360 images); the runs saw a 240-image stratified " \
           "subset of it, about 67%."
    assert summary["setup"]["subset"]["used"] == dict.fromkeys(summary["table"]["pairs"], 240)
    setup = md.split("## Setup", 1)[1].split("## Recommendation", 1)[0]
    tail = md.split("## The long tail", 1)[1].split("## Training cost", 1)[0]
    captions = {f["file"].split("/")[1][0]: f["caption"] for f in summary["figures"]}
    assert said in setup and said in captions["2"] and said in captions["3"] and said not in captions["1"]
    paragraphs = tail.split("\n\n")
    intro = next(para for para in paragraphs if para.startswith("Long-tail tags have fewer than 20 training images "
                                                                "in the train split"))
    before_table = next(para for para in paragraphs if para.startswith("The 10 rare tags"))
    assert said in intro and before_table.endswith(said)
    assert "| tag | training images in the train split | test positives |" in tail


def test_long_tail_leader_is_tested_against_the_runner_up_on_the_tail(report, fake_runs):
    runs, _ = fake_runs
    _, summary, md = report
    tail = summary["long_tail"]
    lead = tail["leader"]
    values = {p: v["value"] for p, v in tail["tail_f1"].items()}
    assert lead["pair"] == max(values, key=values.get) == "dinov2-ft"
    assert lead["runner_up"] == sorted(values, key=values.get)[-2]
    res = lead["result"]
    assert res["bucket"] == "tail" and (res["a"], res["b"]) == (lead["pair"], lead["runner_up"])
    assert f"the runner-up on the tail is {lead['runner_up']} ({fmt.num(values[lead['runner_up']])}), difference " \
           f"{fmt.signed_ci(res['observed_diff'], res['ci'])}" in md
    verdict = "separated: the 95% CI excludes 0" if res["separated"] else "inconclusive: the 95% CI includes 0"
    assert f"P(dinov2-ft better) = {res['p_a_better']:.2f} — {verdict}." in md
    metrics = read_json(runs / "dinov2-ft/eval/torch/metrics.json")["buckets"]["tail"]
    assert f"({metrics['n_tags_scored']} of the {metrics['n_tags']} long-tail tags have a test positive)" in md


def test_figure_captions_state_merged_phases_and_tolerances(report):
    _, summary, _ = report
    captions = {f["file"].split("/")[1][0]: f["caption"] for f in summary["figures"]}
    assert "numbered and listed in the legend" in captions["1"]
    assert ('"other (< 1% each)" sums the phases too short to see (load weights, image cache, threshold fitting): '
            "0.5 s to 4.0 s per pair." in captions["4"])
    assert ("Dotted lines: the export tolerance, ±0.002 for fp32, ±0.005 for fp16; outside it: clip-ft on ONNX "
            "Runtime fp16." in captions["5"])


def test_training_time_is_the_sum_of_phases_in_table_figure_and_rule(report, fake_runs):
    runs, _ = fake_runs
    _, summary, md = report
    rows = table_rows(md)
    training = summary["table"]["pairs"]["dinov2-probe"]["training"]
    assert training["training_seconds"]["value"] == pytest.approx(90)  # its timing.json total says 31.95
    assert read_json(runs / "dinov2-probe/timing.json")["seconds"]["total"] == pytest.approx(31.95)
    differs, reused = notes(md, line_with(rows["dinov2-probe"][columns(md)["Training time"]], "90 s training time"))
    assert differs.split(" ", 1)[1].startswith("timing.json's total differs from the sum of its phases")
    assert "before" not in differs and "fix" not in differs  # said for readers, not for developers
    assert differs.endswith(": dinov2-probe.") and "reused cache" in reused  # the other totals are the sums
    ft = rows["dinov2-ft"][columns(md)["Training time"]]
    assert ft.startswith("6.7 min training time<br>with probe 8.2 min")
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
    assert deltas == 5
    chosen = summary["recommendation"]
    assert f"{read_json(runs / chosen['chosen_eval'])['macro_f1']:.3f}" in chosen["text"][0]


def test_long_tail_section_and_provenance(report, fake_runs):
    runs, _ = fake_runs
    _, summary, md = report
    tail = summary["long_tail"]
    assert len(tail["backbones"]) == 6 and len(tail["finetune"]) == 3 and len(tail["disagreements"]) == 10
    verdicts = {c["family"]: c["result"]["separated"] for c in tail["finetune"]}
    assert verdicts["dinov2"] is True and verdicts["clip"] is False
    assert "DINOv2: fine-tuning **helps** the tail (dinov2-ft − dinov2-probe +" in md
    assert "CLIP: fine-tuning's effect on the tail is **inconclusive: the 95% CI includes 0** (clip-ft − " in md
    # the random-init cnn-probe: marked in comparisons, its fine-tuning sentence flagged, left out of the spread
    assert "| linear probe | cnn-probe (random init) − dinov2-probe |" in md
    cnn = next(line for line in md.splitlines() if line.startswith("- CNN: "))
    assert "cnn-ft − cnn-probe (random init)" in cnn and cnn.endswith("says nothing about fine-tuning the pretrained "
                                                                       "backbone.")
    assert tail["left_out_of_disagreements"] == ["cnn-probe"]
    assert all("cnn-probe" not in r["f1"] for r in tail["disagreements"])
    row = tail["disagreements"][0]
    assert type(row["train_count"]) is int and type(row["support"]) is int
    assert row["sources"] == [f"{p}/eval/torch/per_tag.csv" for p in row["f1"]]
    assert all((runs / source).is_file() for source in row["sources"])
    assert "random-init pairs (cnn-probe) are left out of the spread" in md
    # field by field (every fake tag is tag=tNN: one field), from each pair's per_tag.csv
    with open(runs / "dinov2-ft/eval/torch/per_tag.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if float(r["support"]) > 0]
    tail_rows = [float(r["f1"]) for r in rows if r["bucket"] == "tail"]
    field = tail["fields"]["tag"]["dinov2-ft"]
    assert (field["n_tags"], field["n_tail"]) == (len(rows), len(tail_rows))
    assert field["macro_f1"] == pytest.approx(sum(float(r["f1"]) for r in rows) / len(rows))
    assert field["tail_macro_f1"] == pytest.approx(sum(tail_rows) / len(tail_rows))
    assert f"| tag | {len(rows)} ({len(tail_rows)}) |" in md
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
            "print([m for m in ('torch', 'timm', 'open_clip', 'onnx', 'onnxruntime', 'tensorrt', 'bakeoff.train.registry')"
            " if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_ids_hash_matches_evaluate():
    from bakeoff.evaluate.score import ids_sha256 as evaluate_ids_sha256

    assert ids_sha256(["a", "b", "c"]) == evaluate_ids_sha256(["a", "b", "c"])


def test_document_renders_tables_and_bold(tmp_path):
    blocks = [Para("a **b** <c>"), Bullets(["x"]), Table(["h|1", "h2"], [["1|2", ["l1", "l2"]]], ["n¹ note"])]
    md = to_markdown(blocks)
    assert "| h\\|1 | h2 |" in md and "| 1\\|2 | l1<br>l2 |" in md and "n¹ note" in md
    html = to_html(blocks, "t")
    assert "<p>a <strong>b</strong> &lt;c&gt;</p>" in html and "<span>l1</span><br><span>l2</span>" in html


def test_best_epoch_reads_the_final_run_not_the_trials():
    from bakeoff.reports.setup import best_epoch

    trials = [{"trial": k, "lr": lr, "epoch": 1, "val_map": m} for k, (lr, m) in enumerate([(1e-4, 0.9), (3e-4, 0.8)])]
    final = [{"run": "final", "lr": 1e-4, "epoch": e, "val_map": m} for e, m in [(1, 0.5), (2, 0.7), (3, 0.6)]]
    assert best_epoch(trials + final) == (2, 3)
    assert best_epoch(trials) == (1, 1)  # a history from before final runs were marked: every record counts
