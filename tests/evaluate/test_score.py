"""bakeoff.evaluate.score on the tiny runs: files, an independent scikit-learn recomputation, skips, refusals, failures."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from bakeoff.common.io import read_json, write_json
from bakeoff.engines.runners import RUNTIMES, Runner, open_runner
from bakeoff.evaluate import score as S
from bakeoff.evaluate.__main__ import main
from bakeoff.evaluate.metrics import PER_TAG_COLUMNS
from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.run import RunError
from bakeoff.train.weights import RANDOM_FLAG

PAIRS = ("cnn-probe", "cnn-ft")


class FixedRunner(Runner):
    """A fake runtime that hands out preset logits in the order batches arrive (one pass over the test rows)."""

    name, device = "fixed", "test"

    def __init__(self, logits: np.ndarray, precision: str):
        self.logits, self.precision, self.pos = np.asarray(logits, dtype=np.float32), precision, 0

    def predict(self, batch) -> np.ndarray:
        out = self.logits[self.pos:self.pos + len(batch)]
        self.pos += len(batch)
        return out


def register_fixed(monkeypatch, logits: dict) -> None:
    """Register runtime ``fixed`` serving ``logits[(run name, precision)]``; its default precision is fp32."""
    def factory(run_dir, precision: str = "fp32", **_) -> FixedRunner:
        return FixedRunner(logits[(Path(run_dir).name, precision)], precision)
    monkeypatch.setitem(RUNTIMES, "fixed", factory)


def copy_runs(src: Path, dst: Path, names: list[tuple[str, str]] | None = None) -> Path:
    """Copy runs ``[(source pair, new name), ...]`` (default: both tiny runs) into ``dst``."""
    for pair, name in names or [(p, p) for p in PAIRS]:
        shutil.copytree(src / pair, dst / name)
    return dst


def torch_sigmoid(logits: np.ndarray) -> np.ndarray:
    """The float32 sigmoid evaluation used before decision rules: the reference for groupless runs."""
    return torch.sigmoid(torch.from_numpy(np.asarray(logits, dtype=np.float32))).numpy()


def held_out_labels(data: Path) -> tuple[np.ndarray, np.ndarray]:
    ds = load_dataset(data)
    rows = ds.split_indices("test")
    return rows, ds.labels()[rows]


def rule_of(run_dir: Path) -> tuple[np.ndarray, list[list[int]]]:
    """(thresholds, groups as tag columns) read straight from thresholds.json (no groups in an old file)."""
    doc = read_json(run_dir / "thresholds.json")
    col = {t: j for j, t in enumerate(doc["tags"])}
    return np.array(doc["thresholds"]), [[col[t] for t in g] for g in doc.get("groups", [])]


def expected_scores(logits: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """Sigmoid of each logit, softmax over each group's logits (written out here, not train.decision's)."""
    z = np.asarray(logits, np.float64)
    out = 1 / (1 + np.exp(-z))
    for g in groups:
        e = np.exp(z[:, g] - z[:, g].max(1, keepdims=True))
        out[:, g] = e / e.sum(1, keepdims=True)
    return out


def expected_decisions(scores: np.ndarray, thresholds: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """score >= threshold, but exactly one tag per group per image: the group's arg-max."""
    pred = scores >= thresholds
    for g in groups:
        pred[:, g] = np.eye(len(g), dtype=bool)[np.argmax(scores[:, g], axis=1)]
    return pred


@pytest.fixture(scope="module")
def scored(tiny_runs, tiny_data, tmp_path_factory):
    runs = copy_runs(tiny_runs, tmp_path_factory.mktemp("scored"))
    lines: list[str] = []
    results = S.evaluate_all(runs, tiny_data, "torch", device="cpu", log=lines.append)
    return runs, results, lines


def test_writes_eval_files_in_test_order(scored, tiny_data):
    runs, results, lines = scored
    ds = load_dataset(tiny_data)
    rows = ds.split_indices("test")
    assert set(results) == set(PAIRS) and len(lines) == 2
    for pair in PAIRS:
        out = runs / pair / "eval" / "torch"
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_tag.csv", "predictions.npy"]
        probs = np.load(out / "predictions.npy")
        assert probs.dtype == np.float32 and probs.shape == (len(rows), len(ds.taxonomy))
        assert ((probs >= 0) & (probs <= 1)).all()
        with open(out / "per_tag.csv", newline="") as f:
            table = list(csv.DictReader(f))
        assert tuple(table[0]) == PER_TAG_COLUMNS and [r["name"] for r in table] == ds.taxonomy
        thr, groups = rule_of(runs / pair)
        for g in groups:  # softmax scores within each group, one field per group
            np.testing.assert_allclose(probs[:, g].sum(axis=1), 1.0, atol=1e-5)
            assert {table[j]["decided_by"] for j in g} == {f"argmax:{ds.fields[ds.taxonomy[g[0]]]}"}
            assert {table[j]["threshold"] for j in g} == {""}
        free = [j for j in range(len(thr)) if not any(j in g for g in groups)]
        assert all(table[j]["decided_by"] == "threshold" and float(table[j]["threshold"]) == thr[j] for j in free)
        m = read_json(out / "metrics.json")
        assert m["decision"]["groups"] == [ds.fields[ds.taxonomy[g[0]]] for g in groups]
        assert m == results[pair]
        assert (m["status"], m["pair"], m["eval"], m["precision"]) == ("scored", pair, "torch", "fp32")
        assert "per_tag" not in m
        expected_ids = hashlib.sha256("\n".join(ds.ids[i] for i in rows).encode()).hexdigest()
        assert m["test"] == {"split": "test", "n_images": len(rows), "ids_sha256": expected_ids,
                             "order": "ds.split_indices('test') (manifest order)"}
        assert m["dataset"]["hash"] == ds.content_hash()
        assert m["random_init"] and m["warning"] == RANDOM_FLAG  # the tiny runs are random init
        phases = {k: v for k, v in read_json(runs / pair / "timing.json")["seconds"].items() if k not in ("total", "wall")}
        assert m["training"]["seconds"] == round(sum(phases.values()), 3)
        assert m["inference"]["images_per_s"] > 0 and m["versions"]["torch"]
        assert (m["ci"]["n_resamples"], m["ci"]["seed"]) == (1000, 0)
        for key in ("macro_f1", "tail_macro_f1", "medium_macro_f1"):
            lo, hi = m["ci"][key]
            assert 0 <= lo <= hi <= 1
        assert m["ci"]["head_macro_f1"] == [None, None]  # no tag has 500 training images here
        assert "vs_fp32" not in m


def test_metrics_match_sklearn_recomputation(scored, tiny_data):
    """macro-F1, tail-F1 and mAP recomputed from predictions.npy with scikit-learn."""
    runs, _, _ = scored
    rows, y = held_out_labels(tiny_data)
    ds = load_dataset(tiny_data)
    stats = ds.stats()
    train_counts = np.array([stats["tags"][t]["train"] for t in ds.taxonomy])
    has_pos = y.sum(axis=0) > 0
    tail = has_pos & (train_counts < stats["long_tail_threshold"])
    assert 0 < tail.sum() < has_pos.sum()  # the check covers a real subset
    for pair in PAIRS:
        out = runs / pair / "eval" / "torch"
        probs = np.load(out / "predictions.npy")
        pred = expected_decisions(probs, *rule_of(runs / pair))
        m = read_json(out / "metrics.json")
        assert m["macro_f1"] == pytest.approx(f1_score(y[:, has_pos], pred[:, has_pos], average="macro", zero_division=0))
        assert m["buckets"]["tail"]["macro_f1"] == pytest.approx(
            f1_score(y[:, tail], pred[:, tail], average="macro", zero_division=0))
        aps = [average_precision_score(y[:, j], probs[:, j]) for j in np.flatnonzero(has_pos)]
        assert m["macro_ap"] == pytest.approx(np.mean(aps))
        with open(out / "per_tag.csv", newline="") as f:
            f1_csv = [float(r["f1"]) if r["f1"] else None for r in csv.DictReader(f)]
        ref = f1_score(y, pred, average=None, zero_division=0)
        assert [v is None for v in f1_csv] == list(~has_pos)
        assert np.allclose([v for v in f1_csv if v is not None], ref[has_pos])


def test_prediction_rows_are_the_test_rows_in_order(scored, tiny_data):
    """Re-predict three test rows directly: they match the matching rows of predictions.npy."""
    runs, _, _ = scored
    ds = load_dataset(tiny_data)
    rows = ds.split_indices("test")
    pick = np.array([5, 0, len(rows) - 1])
    config = read_json(runs / "cnn-ft" / "config.json")
    images = load_cache(ds, config["preprocess"]["cache_size"])
    runner = open_runner(runs / "cnn-ft", "torch", device="cpu")
    logits = runner.predict(Preprocess.from_config(config["preprocess"])(images[rows[pick]]))
    probs = np.load(runs / "cnn-ft" / "eval" / "torch" / "predictions.npy")
    np.testing.assert_allclose(expected_scores(logits, rule_of(runs / "cnn-ft")[1]), probs[pick], atol=1e-5)


def test_eval_names_follow_the_runtime_default():
    assert S.eval_name("torch") == S.eval_name("torch", "fp32") == "torch"
    assert S.eval_name("torch", "bf16") == "torch-bf16"
    with pytest.raises(ValueError, match="unknown runtime 'nope'"):
        S.eval_name("nope", "fp16")


def test_reduced_precision_records_deltas_vs_fp32(scored, tiny_data):
    runs, _, _ = scored
    m = S.evaluate_run(runs / "cnn-probe", tiny_data, "torch", device="cpu", precision="bf16")
    assert (m["eval"], m["precision"]) == ("torch-bf16", "bf16")
    fp32 = read_json(runs / "cnn-probe" / "eval" / "torch" / "metrics.json")
    p32 = np.load(runs / "cnn-probe" / "eval" / "torch" / "predictions.npy")
    p16 = np.load(runs / "cnn-probe" / "eval" / "torch-bf16" / "predictions.npy")
    thr, groups = rule_of(runs / "cnn-probe")
    d = m["vs_fp32"]
    assert d["reference"] == "torch"
    assert d["macro_f1"] == pytest.approx(m["macro_f1"] - fp32["macro_f1"])
    assert d["max_abs_prob"] == pytest.approx(np.abs(p16.astype(float) - p32).max()) and d["max_abs_prob"] > 0
    assert d["decisions_flipped"] == pytest.approx(
        np.mean(expected_decisions(p16, thr, groups) != expected_decisions(p32, thr, groups)))


def test_incomplete_run_is_skipped(tiny_runs, tiny_data, tmp_path, monkeypatch):
    runs = copy_runs(tiny_runs, tmp_path, [("cnn-probe", "cnn-probe"), ("cnn-ft", "cnn-half")])
    config = read_json(runs / "cnn-half" / "config.json")
    write_json(runs / "cnn-half" / "config.json", config | {"status": "running"})
    register_fixed(monkeypatch, {("cnn-probe", "fp32"): np.zeros(held_out_labels(tiny_data)[1].shape)})
    lines: list[str] = []
    results = S.evaluate_all(runs, tiny_data, "fixed", log=lines.append)
    assert results["cnn-half"]["status"] == "skipped" and results["cnn-probe"]["status"] == "scored"
    assert "cnn-half: skipped, the run is incomplete" in lines
    assert not (runs / "cnn-half" / "eval").exists()
    with pytest.raises(RunError, match="not a complete run"):
        S.evaluate_run(runs / "cnn-half", tiny_data, device="cpu")
    with pytest.raises(RunError, match="no run named cnn-nope"):
        S.evaluate_all(runs, tiny_data, pairs=["cnn-nope"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_outputs_fail_the_run(tiny_runs, tiny_data, tmp_path, monkeypatch, capsys, bad):
    runs = copy_runs(tiny_runs, tmp_path)
    rows, y = held_out_labels(tiny_data)
    good = np.zeros(y.shape)
    broken = good.copy()
    broken[3, 7] = bad
    register_fixed(monkeypatch, {("cnn-probe", "fp32"): good, ("cnn-ft", "fp32"): broken})
    stale = runs / "cnn-ft" / "eval" / "fixed"
    stale.mkdir(parents=True)
    np.save(stale / "predictions.npy", good)  # an earlier evaluation's file must not survive
    code = main(["--runs", str(runs), "--data", str(tiny_data), "--runtime", "fixed", "--device", "cpu", "--no-progress"])
    assert code == 1
    assert "cnn-ft" in capsys.readouterr().err
    m = read_json(stale / "metrics.json")
    assert m["status"] == "failed" and "the run is failed" in m["reason"]
    assert (m["n_nan"], m["n_inf"]) == ((1, 0) if np.isnan(bad) else (0, 1))
    assert sorted(p.name for p in stale.iterdir()) == ["metrics.json"]
    assert read_json(runs / "cnn-probe" / "eval" / "fixed" / "metrics.json")["status"] == "scored"


def test_other_taxonomy_or_dataset_is_refused(tiny_runs, tiny_data, tmp_path):
    runs = copy_runs(tiny_runs, tmp_path, [("cnn-probe", "cnn-probe")])
    cfg_path = runs / "cnn-probe" / "config.json"
    config = read_json(cfg_path)
    write_json(cfg_path, config | {"taxonomy": ["colour=Mauve", *config["taxonomy"][1:]]})
    with pytest.raises(RunError, match="taxonomy"):
        S.evaluate_run(runs / "cnn-probe", tiny_data, device="cpu")
    results = S.evaluate_all(runs, tiny_data, device="cpu", log=lambda _: None)
    assert results["cnn-probe"]["status"] == "refused"
    write_json(cfg_path, config | {"dataset": {**config["dataset"], "hash": "0" * 64}})
    with pytest.raises(RunError, match="test split is not held out"):
        S.evaluate_run(runs / "cnn-probe", tiny_data, device="cpu")
    assert not (runs / "cnn-probe" / "eval").exists()


def test_current_evaluation_is_kept_unless_forced(scored, tiny_data):
    runs, _, _ = scored
    metrics = runs / "cnn-probe" / "eval" / "torch" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    lines: list[str] = []
    S.evaluate_all(runs, tiny_data, "torch", device="cpu", log=lines.append, pairs=["cnn-probe"])
    assert metrics.stat().st_mtime_ns == before and "current, kept" in lines[0]
    S.evaluate_all(runs, tiny_data, "torch", device="cpu", log=lines.append, pairs=["cnn-probe"], force=True)
    assert metrics.stat().st_mtime_ns != before


def test_a_rewritten_config_makes_the_evaluation_stale(tiny_runs, tiny_data, tmp_path):
    """A retrain that reproduces the checkpoint still rewrites config.json; the report then calls the evaluation
    stale, so evaluate must redo it too (else the pair stays unscored)."""
    runs = copy_runs(tiny_runs, tmp_path, [("cnn-probe", "cnn-probe")])
    ds = load_dataset(tiny_data)
    S.evaluate_all(runs, tiny_data, "torch", device="cpu", pairs=["cnn-probe"])
    assert S.current_eval(runs / "cnn-probe", "torch", ds) is not None
    config = runs / "cnn-probe" / "config.json"
    config.write_text(config.read_text().replace('"status": "complete"', '"status": "complete", "retrained": true'))
    assert S.current_eval(runs / "cnn-probe", "torch", ds) is None


def test_rescore_recomputes_scores_from_saved_predictions_only(tiny_runs, tiny_data, tmp_path, capsys):

    runs = copy_runs(tiny_runs, tmp_path)
    S.evaluate_all(runs, tiny_data, "torch", device="cpu", log=lambda _: None)
    out = runs / "cnn-probe" / "eval" / "torch"
    fresh = read_json(out / "metrics.json")
    predictions = (out / "predictions.npy").read_bytes()
    edited = fresh | {"macro_f1": 0.0, "ci": {"macro_f1": [0.0, 0.0]}}  # what old metric code might have left
    (out / "metrics.json").write_text(json.dumps(edited))
    (runs / "cnn-ft" / "thresholds.json").write_text((runs / "cnn-ft" / "thresholds.json").read_text() + " ")
    assert main(["rescore", "--runs", str(runs), "--data", str(tiny_data)]) == 0
    printed = capsys.readouterr().err  # status lines: stderr
    again = read_json(out / "metrics.json")
    assert {k: v for k, v in again.items() if k != "rescored"} == fresh and again["rescored"]
    assert again["ci"]["method"] == "BCa" and (out / "predictions.npy").read_bytes() == predictions
    assert "cnn-probe (torch): rescored" in printed and "cnn-ft (torch): left alone: stale" in printed


def confident_logits(y: np.ndarray, seed: int) -> np.ndarray:
    """Logits that mostly agree with ``y``, with enough noise for errors."""
    return (3.0 * (2.0 * y - 1) + np.random.default_rng(seed).normal(0, 2.0, y.shape)).astype(np.float32)


def brand_group(ds) -> list[int]:
    return [j for j, t in enumerate(ds.taxonomy) if ds.fields[t] == "brand"][:3]


@pytest.fixture
def grouped_run(tiny_runs, tiny_data, tmp_path, monkeypatch) -> tuple[Path, np.ndarray, np.ndarray, list[int]]:
    """A copy of cnn-probe whose thresholds.json has one 3-tag group (three brand tags), scored by runtime
    ``fixed`` on preset logits: (run dir, logits, thresholds, group). Image 0's arg-max tag in the group is below
    its threshold; image 1 has two group tags above their thresholds."""
    runs = copy_runs(tiny_runs, tmp_path / "runs", [("cnn-probe", "grouped-probe")])
    run = runs / "grouped-probe"
    ds = load_dataset(tiny_data)
    group = brand_group(ds)
    thr = np.full(len(ds.taxonomy), 0.5)
    thr[group[0]] = 0.8
    write_json(run / "thresholds.json", {"thresholds": thr.tolist(), "tags": ds.taxonomy,
                                         "groups": [[ds.taxonomy[j] for j in group]]})
    _, y = held_out_labels(tiny_data)
    logits = confident_logits(y, 7)
    logits[0, group] = [-3.0, -4.0, -5.0]  # softmax 0.67 < threshold 0.8 (sigmoid 0.05): still the field's value
    logits[1, group] = [2.0, 1.5, -5.0]  # sigmoid 0.88 >= 0.8 and 0.82 >= 0.5: still one value
    register_fixed(monkeypatch, {("grouped-probe", "fp32"): logits})
    return run, logits, thr, group


def test_a_group_is_decided_by_argmax_within_the_field(grouped_run, tiny_data):
    run, logits, thr, group = grouped_run
    ds = load_dataset(tiny_data)
    _, y = held_out_labels(tiny_data)
    m = S.evaluate_run(run, ds, "fixed")
    out = run / "eval" / "fixed"
    probs = np.load(out / "predictions.npy")
    np.testing.assert_allclose(probs, expected_scores(logits, [group]), rtol=1e-6, atol=1e-7)
    pred = expected_decisions(probs, thr, [group])
    assert pred[0, group].tolist() == [True, False, False] and pred[1, group].tolist() == [True, False, False]
    assert pred[:, group].sum(axis=1).tolist() == [1] * len(y)  # one value per image
    has_pos = y.sum(axis=0) > 0
    assert m["macro_f1"] == pytest.approx(f1_score(y[:, has_pos], pred[:, has_pos], average="macro", zero_division=0))
    with open(out / "per_tag.csv", newline="") as f:
        table = list(csv.DictReader(f))
    masks = {b: np.array([r["bucket"] == b for r in table]) for b in S.BUCKETS}
    assert m["ci"] == S.bootstrap_cis(y, pred, masks)  # the intervals resample these decisions
    for j, row in enumerate(table):
        want = ("", "argmax:brand") if j in group else (str(thr[j]), "threshold")
        assert (row["threshold"], row["decided_by"]) == want
        assert int(row["predicted"]) == pred[:, j].sum()
    assert m["threshold_rule"] == "group tags: arg-max within the field; other tags: score >= threshold"
    assert m["decision"]["groups"] == ["brand"] and m["decision"]["n_group_tags"] == 3
    assert m["decision"]["score"] == "softmax within each group, sigmoid elsewhere"

    # rescore works from the saved scores with the same rule; scores saved as sigmoids (an evaluation from
    # before groups existed) are not this rule's and are left alone, and evaluate does them again
    assert S.rescore_run(run, ds)["fixed"].startswith("rescored")
    again = read_json(out / "metrics.json")
    assert {k: v for k, v in again.items() if k != "rescored"} == m
    write_json(out / "metrics.json", {k: v for k, v in m.items() if k != "decision"})
    assert S.rescore_run(run, ds)["fixed"].startswith("left alone")
    assert S.current_eval(run, "fixed", ds) is None
    lines: list[str] = []
    redone = S.evaluate_all(run.parent, ds, "fixed", log=lines.append)["grouped-probe"]
    assert "current, kept" not in lines[0] and redone["decision"] == m["decision"]
    assert redone["macro_f1"] == m["macro_f1"]


def test_a_run_without_groups_scores_exactly_as_before(tiny_runs, tiny_data, tmp_path, monkeypatch):
    """thresholds.json as written before groups existed: sigmoid scores and ``score >= threshold`` for every tag,
    the numbers the plain threshold rule gives."""
    runs = copy_runs(tiny_runs, tmp_path, [("cnn-probe", "old-probe")])
    ds = load_dataset(tiny_data)
    thr = np.random.default_rng(3).uniform(0.2, 0.8, len(ds.taxonomy))
    write_json(runs / "old-probe" / "thresholds.json", {"thresholds": thr.tolist(), "tags": ds.taxonomy})
    _, y = held_out_labels(tiny_data)
    logits = confident_logits(y, 8)
    register_fixed(monkeypatch, {("old-probe", "fp32"): logits})
    m = S.evaluate_run(runs / "old-probe", ds, "fixed")
    out = runs / "old-probe" / "eval" / "fixed"
    probs = np.load(out / "predictions.npy")
    # the old float32 sigmoid, to the last bit of float32 (the rule computes in float64, then rounds)
    np.testing.assert_allclose(probs, torch_sigmoid(logits), rtol=0, atol=6e-8)
    old, _ = S.score_predictions(torch_sigmoid(logits), y, thr, ds.stats(), ds.taxonomy)  # plain thresholds
    assert {k: m[k] for k in old} == old
    has_pos = y.sum(axis=0) > 0
    assert m["macro_f1"] == pytest.approx(
        f1_score(y[:, has_pos], (probs >= thr)[:, has_pos], average="macro", zero_division=0))
    assert m["macro_f1_at_0.5"] == pytest.approx(
        f1_score(y[:, has_pos], (probs >= 0.5)[:, has_pos], average="macro", zero_division=0))
    with open(out / "per_tag.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in table] == thr.tolist() and {r["decided_by"] for r in table} == {"threshold"}
    assert m["threshold_rule"] == "score >= threshold" and m["decision"]["groups"] == []
    assert S.current_eval(runs / "old-probe", "fixed", ds) == m
    # an evaluation written before groups existed (no "decision" record) of such a run is still current
    write_json(out / "metrics.json", {k: v for k, v in m.items() if k != "decision"})
    assert S.current_eval(runs / "old-probe", "fixed", ds) is not None
    assert S.rescore_run(runs / "old-probe", ds)["fixed"].startswith("rescored")
    assert {k: v for k, v in read_json(out / "metrics.json").items() if k != "rescored"} == m


def test_read_decision_refuses_a_group_of_unknown_tags(tiny_runs, tmp_path):
    runs = copy_runs(tiny_runs, tmp_path, [("cnn-probe", "cnn-probe")])
    path = runs / "cnn-probe" / "thresholds.json"
    taxonomy = read_json(runs / "cnn-probe" / "config.json")["taxonomy"]
    write_json(path, read_json(path) | {"groups": [["colour=mauve", taxonomy[0]]]})
    with pytest.raises(RunError, match="group tag 'colour=mauve' is not in the run's taxonomy"):
        S.read_decision(runs / "cnn-probe", taxonomy)
    assert S.read_thresholds is S.read_decision
