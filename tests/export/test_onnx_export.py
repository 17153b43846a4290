"""ONNX export, FP16 conversion and parity on tiny runs of the three families, and the CLI around them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bakeoff.common.io import read_json, sha256_file, write_json
from bakeoff.export.__main__ import main
from bakeoff.export.fp16 import FP32_OPS, convert_fp16, precision_summary
from bakeoff.export.onnx_export import (
    ONNX_FP16,
    ONNX_FP32,
    ExportError,
    check_onnx,
    export_onnx,
    metadata_decision,
    read_metadata,
)
from bakeoff.export.parity import (
    DEFAULT_TOLERANCES,
    ParityFailed,
    Tolerance,
    compare,
    judge,
    ort_logits,
    parity_inputs,
    parity_report,
    parity_rows,
    torch_logits,
    write_parity,
)
from bakeoff.export.pipeline import ExportOptions, current_onnx
from bakeoff.export.tensorrt import trt_unavailable_reason
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.decision import Decision
from bakeoff.train.run import load_run, train_pair
from tests.conftest import tiny_options


@pytest.fixture(scope="module")
def vit_exports(tiny_data, tmp_path_factory):
    """Tiny random-init dinov2-probe and clip-probe runs, exported: family -> (run dir, fp32 path, fp16 summary)."""
    out = tmp_path_factory.mktemp("vit-runs")
    result = {}
    for family in ("dinov2", "clip"):
        run = train_pair(tiny_data, out, tiny_options(family, "probe"))
        path = export_onnx(run)
        result[family] = (run, path, convert_fp16(path, path.with_name(ONNX_FP16)))
    return result


def test_cli_exports_checks_and_reports(cnn_export):
    code, out, err, run = cnn_export
    assert code == 0, err
    assert "WARNING half-done: skipped, not complete" in err
    assert "cnn-probe: parity passed on 48 test images" in err and out == ""  # status goes to stderr
    report = json.loads((run / "export" / "parity.json").read_text())
    assert report["status"] == "passed" and report["failures"] == [] and report["n_images"] == 48
    assert report["n_tags"] == 30 and report["dataset_matches_run"]
    _, config, decision = load_run(run)
    assert report["thresholds_sha256"] == sha256_file(run / "thresholds.json")
    assert report["decision"]["groups"] == [[config["taxonomy"][j] for j in g] for g in decision.groups]
    assert report["decision"]["n_groups"] == len(decision.groups)
    for name, precision in (("onnx_fp32", "fp32"), ("onnx_fp16", "fp16")):
        r = report["results"][name]
        assert r["precision"] == precision and r["decisions"] == 48 * 30 and r["status"] == "passed"
        assert set(r) >= {"max_abs_logit", "mean_abs_logit", "max_abs_prob", "flips", "flip_rate", "sha256"}
    fp32, fp16 = report["results"]["onnx_fp32"], report["results"]["onnx_fp16"]
    assert fp32["max_abs_prob"] < 1e-4 and fp32["flips"] == 0
    assert fp32["max_abs_logit"] < fp16["max_abs_logit"] < 1.0  # fp16 looser, still close
    graph = report["graphs"]["onnx_fp32"]
    assert graph["input"]["shape"][0] == "batch" and graph["input"]["shape"][1:] == [3, 32, 32]
    assert graph["opset"] >= 17 and "Resize" not in graph["ops"]


@pytest.mark.skipif(trt_unavailable_reason() is None, reason="TensorRT and a GPU are present: an engine is built")
def test_cli_says_once_per_run_that_no_engine_was_built(cnn_export):
    _, _, err, run = cnn_export
    lines = [line for line in err.splitlines() if "engine" in line]
    assert len(lines) == 1 and lines[0].startswith("cnn-probe: no TensorRT engine built: tensorrt is not importable")
    assert not list((run / "export").glob("*.engine*"))


def test_metadata_and_graph_contract(cnn_export):
    *_, run = cnn_export
    _, config, decision = load_run(run)
    meta = read_metadata(run / "export" / ONNX_FP32)
    assert meta["pair"] == "cnn-probe" and meta["family"] == "cnn" and meta["weights_kind"] == "random"
    assert meta["tags"] == config["taxonomy"] and meta["thresholds"] == pytest.approx(decision.thresholds.tolist())
    assert meta["groups"] == read_json(run / "thresholds.json").get("groups", [])
    assert metadata_decision(meta).groups == decision.groups
    assert ("arg-max" in meta["output"]) == bool(decision.groups)
    assert meta["preprocess"]["img_size"] == 32 and meta["preprocess"]["mean"] == config["preprocess"]["mean"]
    assert meta["source_sha256"] == sha256_file(run / "model.safetensors")
    half = read_metadata(run / "export" / ONNX_FP16)
    assert half["thresholds"] == meta["thresholds"] and half["precision"].startswith("fp16")
    assert half["groups"] == meta["groups"] and half["output"] == meta["output"]


def test_check_rejects_a_static_batch_and_interpolation(cnn_export, tmp_path):
    *_, run = cnn_export
    model = onnx.load(str(run / "export" / ONNX_FP32))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # what pytorch #157621 does
    onnx.save(model, str(tmp_path / "static.onnx"))
    with pytest.raises(ExportError, match=r"static.onnx: input images has shape \[2, 3, 32, 32\].*symbolic batch"):
        check_onnx(tmp_path / "static.onnx")

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [helper.make_node("Resize", ["images", "", "scales"], ["big"], name="pos_embed_resize", mode="cubic"),
             helper.make_node("GlobalAveragePool", ["big"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [scales])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "resize.onnx"))
    with pytest.raises(ExportError, match=r"interpolation nodes \['pos_embed_resize'\]"):
        check_onnx(tmp_path / "resize.onnx")


def test_tampered_model_fails_parity_loudly(cnn_export, cli, tmp_path, monkeypatch):
    *_, run = cnn_export
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / "cnn-probe")
    model = onnx.load(str(run / "export" / ONNX_FP32))
    (bias,) = [t for t in model.graph.initializer if t.name == "head.bias"]
    b = onnx.numpy_helper.to_array(bias)
    shift = np.where(np.arange(b.size) % 2, -0.5, 0.5).astype(b.dtype)  # not one constant: softmax groups ignore that
    bias.CopyFrom(onnx.numpy_helper.from_array(b + shift, bias.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))

    def export_tampered(run_dir, out=None, ds=None) -> Path:  # the exporter "produced" a wrong model
        dst = Path(run_dir) / "export" / ONNX_FP32
        shutil.copy(tampered, dst)
        return dst

    monkeypatch.setattr("bakeoff.export.pipeline.export_onnx", export_tampered)
    code, _, err = cli("--runs", str(runs), "--force")  # the copied export is current: force a re-export
    assert code == 1
    assert "FAILED cnn-probe: ParityFailed" in err and "onnx_fp32:" in err and "decisions flip" in err
    report = json.loads((runs / "cnn-probe" / "export" / "parity.json").read_text())
    assert report["status"] == "failed" and report["results"]["onnx_fp32"]["status"] == "failed"
    assert report["results"]["onnx_fp32"]["max_abs_logit"] == pytest.approx(0.5, abs=1e-3)


def test_cli_refuses_unknown_pairs_and_bad_profiles(cnn_export, cli, capsys):
    *_, run = cnn_export
    assert cli("--runs", str(run.parent), "--pairs", "nope-probe")[0] == 2
    with pytest.raises(SystemExit):
        main(["--runs", str(run.parent), "--min-batch", "8", "--opt-batch", "4"])
    assert "1 <= min <= opt <= max" in capsys.readouterr().err


@pytest.mark.parametrize("family, n_ln", [("dinov2", 25), ("clip", 26)])
def test_vit_export(vit_exports, family, n_ln):
    run, path, fp16 = vit_exports[family]
    model, config, decision = load_run(run)
    graph = check_onnx(path, n_tags=len(config["taxonomy"]))
    assert "Resize" not in graph["ops"] and graph["ops"]["LayerNormalization"] == n_ln
    assert isinstance(graph["input"]["shape"][0], str)
    # FP16 graph: every LayerNorm and Softmax still computes in fp32, the matmuls in fp16
    assert fp16["violations"] == [] and fp16["kept_fp32"]["LayerNormalization"] == n_ln
    assert fp16["kept_fp32"]["Softmax"] == 12 and fp16["fp16_nodes"]["MatMul"] > 0
    assert precision_summary(onnx.load(str(path.with_name(ONNX_FP16))))["kept_fp32"] == fp16["kept_fp32"]
    check_onnx(path.with_name(ONNX_FP16), n_tags=len(config["taxonomy"]))
    # fp32 ONNX matches PyTorch (tight) on real test images
    _, x = parity_inputs(load_dataset(config["dataset"]["path"]), config, 16)
    ref = torch_logits(model, x)
    stats = compare(ref, ort_logits(path, x), decision)
    assert judge(stats, DEFAULT_TOLERANCES["fp32"]) == [] and stats["flips"] == 0
    half = compare(ref, ort_logits(path.with_name(ONNX_FP16), x), decision)
    assert half["finite"]
    if family == "clip":  # random-init DINOv2 (LayerScale 1e-5) is too ill-conditioned to judge fp16 on
        assert half["max_abs_prob"] < 1e-2


def test_fp16_keeps_a_decomposed_layernorm_fp32(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [-1]), helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8).ravel().tolist())]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ReduceMean", ["h", "axes"], ["mu"]), helper.make_node("Sub", ["h", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2", "axes"], ["var"]),
             helper.make_node("Sqrt", ["var"], ["sd"]), helper.make_node("Div", ["d", "sd"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "ln", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "ln.onnx"))
    summary = convert_fp16(tmp_path / "ln.onnx", tmp_path / "ln16.onnx")
    assert summary["kept_fp32"] == {"ReduceMean": 2, "Pow": 1, "Sqrt": 1} and summary["fp16_nodes"]["MatMul"] == 1
    assert set(summary["kept_fp32"]) <= set(FP32_OPS)
    v = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    got = ort_logits(tmp_path / "ln16.onnx", v)
    want = (v - v.mean(1, keepdims=True)) / v.std(1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-2)


def test_compare_and_judge():
    ref = np.zeros((4, 3), np.float32)
    out = ref.copy()
    out[0, 0], out[1, 2] = 0.1, -2.0  # p: 0.525 (crosses 0.51), 0.119 (stays under 0.51)
    stats = compare(ref, out, np.array([0.51, 0.5, 0.51]))
    assert stats["flips"] == 1 and stats["decisions"] == 12 and stats["max_abs_logit"] == pytest.approx(2.0)
    assert stats["max_abs_prob"] == pytest.approx(0.5 - 1 / (1 + np.exp(2.0)))
    assert judge(stats, Tolerance(0.1)) == []
    assert judge(stats, Tolerance(0.05, 0.1)) == ["1 of 12 decisions flip (8.333% > 5.000%)", "max |delta prob| 3.81e-01 > 1e-01"]
    assert judge(compare(ref, out * np.nan, np.full(3, 0.5)), Tolerance(1.0)) == ["non-finite logits"]


def test_parity_report_and_write(tmp_path):
    ref = np.zeros((2, 2))
    rep = parity_report(ref, {"a": {"logits": ref + 1.0, "precision": "fp16", "file": "a.onnx"}}, np.full(2, 0.6),
                        pair="x")
    assert rep["status"] == "failed" and rep["pair"] == "x" and rep["results"]["a"]["file"] == "a.onnx"
    with pytest.raises(ParityFailed, match="a: 4 of 4 decisions flip"):
        write_parity(tmp_path / "parity.json", rep)
    assert json.loads((tmp_path / "parity.json").read_text())["status"] == "failed"


def test_parity_rows_spread_over_test(tiny_data):
    ds = load_dataset(tiny_data)
    test = ds.split_indices("test")
    rows = parity_rows(ds, 5)
    assert len(rows) == 5 and rows[0] == test[0] and rows[-1] == test[-1] and set(rows) <= set(test)
    assert (parity_rows(ds, 10_000) == test).all()


def test_current_onnx_is_skipped_until_the_checkpoint_changes(cnn_export, tmp_path):
    from bakeoff.export.pipeline import ExportOptions, current_onnx

    run = tmp_path / "cnn-probe"
    shutil.copytree(cnn_export[3], run)
    source = sha256_file(run / "model.safetensors")
    assert current_onnx(run, ExportOptions(fp16=True), source)["status"] == "passed"
    assert current_onnx(run, ExportOptions(fp16=True, force=True), source) is None
    with open(run / "model.safetensors", "ab") as f:  # a retrained checkpoint
        f.write(b" ")
    assert current_onnx(run, ExportOptions(fp16=True), sha256_file(run / "model.safetensors")) is None


@pytest.mark.skipif(trt_unavailable_reason() is None, reason="TensorRT and a GPU are present: an engine is built")
def test_a_current_export_still_says_why_no_engine_was_built(cnn_export, cli, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(cnn_export[3], runs / "cnn-probe")
    code, _, err = cli("--fp16", "--runs", str(runs), "--target", "t4", "--no-progress")
    assert code == 0, err
    assert err.splitlines() == ["cnn-probe: export is current (same checkpoint), parity passed; skipped (--force redoes it)",
                                f"cnn-probe: no TensorRT engine built: {trt_unavailable_reason()}"]


def test_compare_counts_an_argmax_swap_within_a_group_as_flips():
    """Two tags of a 3-tag group trade places at the top: two decisions flip (the tag the arg-max leaves and the
    one it takes), though both stay above 0.5 under a plain sigmoid threshold; |Δprob| is on the softmax scores."""
    d = Decision(np.full(4, 0.5), ((0, 1, 2),))
    ref = np.array([[1.0, 0.9, -3.0, 2.0], [0.0, 2.0, 1.0, -2.0]])
    out = ref.copy()
    out[0, :2] = [0.9, 1.0]
    stats = compare(ref, out, d)
    assert stats["flips"] == 2 and stats["flip_rate"] == 2 / 8
    assert compare(ref, out, np.full(4, 0.5))["flips"] == 0  # the same logits under the sigmoid threshold rule
    soft = np.exp(ref[0, :3]) / np.exp(ref[0, :3]).sum()
    assert stats["max_abs_prob"] == pytest.approx(soft[0] - soft[1], rel=1e-5)
    nudged = ref.copy()
    nudged[1, 2] = 1.9  # closer to, but under, the top of its group: no flip
    assert compare(ref, nudged, d)["flips"] == 0
    report = parity_report(ref, {"onnx_fp16": {"logits": out, "precision": "fp16"}}, d, group_tags=[["a"]])
    assert report["status"] == "failed" and "2 of 8 decisions flip" in report["failures"][0]
    assert report["decision"] == {"rule": "group tags: arg-max within the field; other tags: score >= threshold",
                                  "score": "softmax within each group, sigmoid elsewhere", "n_groups": 1,
                                  "n_group_tags": 3, "groups": [["a"]]}


def test_a_rule_without_groups_gives_the_old_parity_numbers():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (64, 10))
    out = ref + rng.normal(0, 0.05, ref.shape)
    thr = rng.uniform(0.2, 0.8, 10)
    stats = compare(ref, out, Decision(thr))
    assert stats == compare(ref, out, thr)
    p_ref, p = 1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-out))
    assert stats["flips"] == ((p_ref >= thr) != (p >= thr)).sum() > 0
    assert stats["max_abs_prob"] == pytest.approx(np.abs(p - p_ref).max(), abs=1e-7)
    assert parity_report(ref, {"onnx_fp32": {"logits": out, "precision": "fp32"}}, thr)["decision"]["n_groups"] == 0


def test_an_export_is_stale_once_the_runs_rule_changes(cnn_export, tmp_path):
    *_, run = cnn_export
    copy = Path(shutil.copytree(run, tmp_path / "cnn-probe"))
    opts, source = ExportOptions(fp16=True), sha256_file(copy / "model.safetensors")
    assert current_onnx(copy, opts, source) is not None
    doc = read_json(copy / "thresholds.json")
    write_json(copy / "thresholds.json", doc | {"thresholds": [0.3] * len(doc["thresholds"])})
    assert current_onnx(copy, opts, source) is None  # its metadata and parity verdict hold the old rule
    parity = copy / "export" / "parity.json"
    old = {k: v for k, v in read_json(parity).items() if k != "thresholds_sha256"}  # from before it was recorded
    write_json(parity, old)
    write_json(copy / "thresholds.json", {k: v for k, v in doc.items() if k != "groups"})
    assert current_onnx(copy, opts, source) is not None  # judged by the rule it had: thresholds only
    write_json(copy / "thresholds.json", doc | {"groups": [doc["tags"][:2]]})
    assert current_onnx(copy, opts, source) is None
