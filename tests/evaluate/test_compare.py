"""bakeoff.evaluate.compare: the table, the paired-bootstrap verdict, and the across-runtimes mode, on preset predictions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from bakeoff.common.io import read_json, write_json
from bakeoff.evaluate import score as S
from bakeoff.evaluate.__main__ import main
from bakeoff.evaluate.compare import compare_table
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.run import RunError
from bakeoff.train.weights import RANDOM_FLAG
from tests.evaluate.test_score import (
    copy_runs,
    expected_decisions,
    expected_scores,
    held_out_labels,
    register_fixed,
)


def noisy_logits(y: np.ndarray, flip: float, seed: int) -> np.ndarray:
    """Confident logits that agree with ``y`` except on a ``flip`` share of cells."""
    rng = np.random.default_rng(seed)
    agree = np.where(rng.random(y.shape) < flip, 1 - y, y)
    return (6.0 * (2.0 * agree - 1) + rng.normal(0, 0.5, y.shape)).astype(np.float32)


def fake_runs(tiny_runs: Path, tiny_data: Path, dst: Path, monkeypatch, logits: dict[str, np.ndarray],
              groups: list[list[str]] | None = None, threshold: float = 0.5) -> Path:
    """Copies of cnn-probe named after ``logits``' keys, ``threshold`` everywhere and ``groups`` (tag names; none
    by default: the plain threshold rule), scored by runtime ``fixed``."""
    runs = copy_runs(tiny_runs, dst, [("cnn-probe", name) for name in logits])
    for name in logits:
        doc = {k: v for k, v in read_json(runs / name / "thresholds.json").items() if k != "groups"}
        write_json(runs / name / "thresholds.json", doc | {"thresholds": [threshold] * len(doc["thresholds"])}
                   | ({"groups": groups} if groups else {}))
    register_fixed(monkeypatch, {(name, "fp32"): v for name, v in logits.items()})
    S.evaluate_all(runs, tiny_data, "fixed", log=lambda _: None)
    return runs


def test_table_and_verdict_for_a_clear_winner(tiny_runs, tiny_data, tmp_path, monkeypatch):
    _, y = held_out_labels(tiny_data)
    nan = noisy_logits(y, 0.0, 3)
    nan[0, 0] = np.nan
    runs = fake_runs(tiny_runs, tiny_data, tmp_path, monkeypatch,
                     {"bad-probe": noisy_logits(y, 0.4, 1), "good-probe": noisy_logits(y, 0.02, 2), "nan-probe": nan})
    rows, text = compare_table(runs, "fixed")
    assert [(r["pair"], r["status"]) for r in rows] == [("good-probe", "scored"), ("bad-probe", "scored"),
                                                        ("nan-probe", "failed")]
    good = read_json(runs / "good-probe" / "eval" / "fixed" / "metrics.json")
    assert rows[0]["macro_f1"] == good["macro_f1"] and rows[0]["macro_f1_ci"] == good["ci"]["macro_f1"]
    assert rows[0]["tail_f1"] == good["buckets"]["tail"]["macro_f1"] and rows[0]["map"] == good["macro_ap"]
    seconds = read_json(runs / "good-probe" / "timing.json")["seconds"]
    assert rows[0]["train_seconds"] == round(sum(v for k, v in seconds.items() if k not in ("total", "wall")), 3)
    assert all(r["random_init"] for r in rows)

    doc = read_json(runs / "compare-fixed.json")
    assert doc["rows"] == rows
    v = doc["verdict"]
    assert (v["a"], v["b"], v["separated"]) == ("good-probe", "bad-probe", True)
    assert v["conclusion"] == "good-probe beats bad-probe"
    assert v["ci"][0] > 0 and v["p_a_better"] > 0.99 and v["n_resamples"] == 1000
    assert v["observed_diff"] == pytest.approx(rows[0]["macro_f1"] - rows[1]["macro_f1"])

    lines = text.splitlines()
    assert [ln.split()[0] for ln in lines[2:5]] == ["good-probe*", "bad-probe*", "nan-probe*"]
    assert "FAILED" in lines[4] and f"* {RANDOM_FLAG}" in text
    assert lines[-1].startswith("Top two: good-probe - bad-probe") and "-> good-probe beats bad-probe" in lines[-1]


def test_verdict_cannot_separate_equally_good_runs(tiny_runs, tiny_data, tmp_path, monkeypatch, capsys):
    _, y = held_out_labels(tiny_data)
    runs = fake_runs(tiny_runs, tiny_data, tmp_path, monkeypatch,
                     {"one-probe": noisy_logits(y, 0.1, 11), "two-probe": noisy_logits(y, 0.1, 12)})
    assert main(["compare", str(runs), "--runtime", "fixed"]) == 0
    out = capsys.readouterr().out
    v = read_json(runs / "compare-fixed.json")["verdict"]
    assert v["ci"][0] <= 0 <= v["ci"][1] and not v["separated"]
    assert 0.02 < v["p_a_better"] < 0.98
    assert "cannot be separated" in out and "one-probe" in out and "two-probe" in out


def test_across_runtimes_reports_deltas_vs_the_reference(tiny_runs, tiny_data, tmp_path, monkeypatch):
    _, y = held_out_labels(tiny_data)
    ref = noisy_logits(y, 0.1, 21)
    half = ref + np.random.default_rng(0).normal(0, 0.3, y.shape).astype(np.float32)
    runs = fake_runs(tiny_runs, tiny_data, tmp_path, monkeypatch, {"cnn-probe": ref})
    register_fixed(monkeypatch, {("cnn-probe", "fp32"): ref, ("cnn-probe", "fp16"): half})
    m16 = S.evaluate_run(runs / "cnn-probe", tiny_data, "fixed", precision="fp16")
    assert m16["eval"] == "fixed-fp16"
    rows, text = compare_table(runs, runtimes=["fixed", "fixed-fp16", "onnxruntime"])
    assert len(rows) == 1
    row = rows[0]
    m32 = read_json(runs / "cnn-probe" / "eval" / "fixed" / "metrics.json")
    assert row["macro_f1"] == {"fixed": m32["macro_f1"], "fixed-fp16": m16["macro_f1"], "onnxruntime": None}
    assert row["status"]["onnxruntime"] == "missing"
    d = row["vs_fixed"]["fixed-fp16"]
    assert d == m16["vs_fp32"]  # the same comparison recorded at scoring time
    assert d["macro_f1"] == pytest.approx(m16["macro_f1"] - m32["macro_f1"])
    p32, p16 = (expected_scores(z, []).astype(np.float32) for z in (ref, half))  # float32 sigmoid probabilities
    assert d["max_abs_prob"] == pytest.approx(np.abs(p16.astype(float) - p32).max())
    assert d["decisions_flipped"] == pytest.approx(np.mean((p16 >= 0.5) != (p32 >= 0.5)))
    assert read_json(runs / "compare-runtimes.json")["rows"] == rows
    assert "fixed-fp16" in text and "missing" in text and f"{d['macro_f1']:+.4f}" in text


def test_compare_without_evaluations_says_so(tmp_path, tiny_runs):
    runs = copy_runs(tiny_runs, tmp_path, [("cnn-probe", "cnn-probe")])
    assert main(["compare", str(runs)]) == 2
    with pytest.raises(RunError, match="no run has a torch evaluation"):
        compare_table(runs)


def test_verdict_and_runtime_deltas_decide_groups_by_argmax(tiny_runs, tiny_data, tmp_path, monkeypatch):
    """With every tag in a group (one per field) and a threshold no score reaches, decisions are the fields'
    arg-maxes: the verdict's macro-F1 and the runtime comparison's flips are those of the arg-max rule."""
    ds = load_dataset(tiny_data)
    _, y = held_out_labels(tiny_data)
    fields: dict[str, list[int]] = {}
    for j, t in enumerate(ds.taxonomy):
        fields.setdefault(ds.fields[t], []).append(j)
    groups = [cols for cols in fields.values() if len(cols) >= 2]
    logits = {"one-probe": noisy_logits(y, 0.1, 31), "two-probe": noisy_logits(y, 0.3, 32)}
    runs = fake_runs(tiny_runs, tiny_data, tmp_path, monkeypatch, logits,
                     groups=[[ds.taxonomy[j] for j in g] for g in groups], threshold=0.999)
    thr = np.full(len(ds.taxonomy), 0.999)
    has_pos = y.sum(axis=0) > 0

    def macro(pred):
        return f1_score(y[:, has_pos], pred[:, has_pos], average="macro", zero_division=0)

    pred = {k: expected_decisions(expected_scores(v, groups), thr, groups) for k, v in logits.items()}
    _, text = compare_table(runs, "fixed")
    v = read_json(runs / "compare-fixed.json")["verdict"]
    assert (v["a"], v["b"]) == ("one-probe", "two-probe")
    assert v["macro_f1_a"] == pytest.approx(macro(pred["one-probe"]))
    assert v["macro_f1_b"] == pytest.approx(macro(pred["two-probe"]))
    plain = macro(expected_scores(logits["one-probe"], []) >= 0.999)  # the threshold alone predicts little
    assert v["macro_f1_a"] > plain + 0.1

    # an fp16 "runtime" that swaps the first group's arg-max on image 0: two flipped decisions, no more
    g = groups[0]
    half = logits["one-probe"].copy()
    order = np.argsort(half[0, g])
    half[0, [g[order[-1]], g[order[-2]]]] = half[0, [g[order[-2]], g[order[-1]]]]
    register_fixed(monkeypatch, {("one-probe", "fp32"): logits["one-probe"], ("one-probe", "fp16"): half})
    m16 = S.evaluate_run(runs / "one-probe", tiny_data, "fixed", precision="fp16")
    assert m16["vs_fp32"]["decisions_flipped"] == pytest.approx(2 / y.size)
    rows, _ = compare_table(runs, runtimes=["fixed", "fixed-fp16"])
    assert next(r for r in rows if r["pair"] == "one-probe")["vs_fixed"]["fixed-fp16"] == m16["vs_fp32"]
