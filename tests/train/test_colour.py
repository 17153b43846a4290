"""Colour histograms as the head's side input (``--colour``): the histograms, the model, a run, its export."""
import json

import numpy as np
import pytest
import torch

from bakeoff.common import shards
from bakeoff.train import run as R
from bakeoff.train.colour import ColourConfig, ColourHistogram
from bakeoff.train.current import changes, expected, recorded
from bakeoff.train.heads import tag_scores
from bakeoff.train.data.cache import load_cache
from bakeoff.train.data.dataset import load_dataset
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.registry import TaggingModel, get_spec
from bakeoff.train.valmetrics import batched_macro_ap
from bakeoff.train.weights import create_backbone
from tests.conftest import tiny_options

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(rgb: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> 1 x 3 x H x W, normalised as a model's input."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0) / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_histograms_of_a_red_square_on_white_count_by_hand():
    img = np.full((40, 40, 3), 250, np.uint8)  # white background
    img[10:30, 10:20] = (200, 20, 20)  # 200 red pixels
    img[10:30, 20:30] = (20, 20, 200)  # 200 blue pixels
    got = ColourHistogram(ColourConfig(bins=4, foreground_distance=0.15), MEAN, STD)(normalised(img))[0].numpy()
    bin_of = lambda r, g, b: (r * 4 + g) * 4 + b  # noqa: E731  (values // 64 with 4 bins)
    whole = np.zeros(64)
    whole[bin_of(3, 3, 3)], whole[bin_of(3, 0, 0)], whole[bin_of(0, 0, 3)] = 1200 / 1600, 200 / 1600, 200 / 1600
    fg = np.zeros(64)
    fg[bin_of(3, 0, 0)] = fg[bin_of(0, 0, 3)] = 0.5  # the background (the border's median) is left out
    np.testing.assert_allclose(got, np.sqrt(np.concatenate([whole, fg])), atol=1e-6)


def test_histograms_are_flip_invariant_and_batch_independent():
    rng = np.random.default_rng(0)
    imgs = torch.cat([normalised(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)) for _ in range(3)])
    m = ColourHistogram(ColourConfig(), MEAN, STD)
    out = m(imgs)
    assert out.shape == (3, ColourConfig().dim) == (3, 432)
    torch.testing.assert_close(m(imgs.flip(-1)), out)
    torch.testing.assert_close(m(imgs[1:2]), out[1:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in fp32 whatever the autocast
        torch.testing.assert_close(m(imgs), out)
    # an image that is all background has an empty foreground histogram, not NaN
    flat = m(normalised(np.full((32, 32, 3), 128, np.uint8)))
    assert torch.isfinite(flat).all() and float(flat[0, 216:].sum()) == 0.0


def test_model_from_trunk_equals_forward_and_the_head_sees_the_histograms():
    spec = get_spec("cnn", "mobilenetv2_100", 32)
    backbone, _ = create_backbone(spec, "random")
    model = TaggingModel(backbone, 7, ColourHistogram(ColourConfig(), spec.mean, spec.std)).eval()
    assert model.head.in_features == backbone.feature_dim + 432
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.from_trunk(backbone.stem(x), model.side(x)), model(x))
        before = model(x)
        model.head.weight[:, backbone.feature_dim:] += 1.0  # the colour part of the head changes the logits
        assert not torch.allclose(model(x), before)
    assert "colour" not in " ".join(model.state_dict())  # no weights: rebuilt from config.json's record


@pytest.fixture(scope="module")
def colour_runs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("colour-runs")
    for strategy in ("probe", "ft"):
        R.train_pair(tiny_data, out, tiny_options("cnn", strategy, colour=True))
    return out


def test_a_colour_run_records_its_histograms_and_rebuilds_them(colour_runs, tiny_data):
    ds = load_dataset(tiny_data)
    for strategy in ("probe", "ft"):
        model, cfg, _ = R.load_run(colour_runs / f"cnn-{strategy}", ds)
        assert cfg["colour"]["dim"] == 432 and cfg["options"]["colour"] is True
        assert model.colour is not None and model.head.in_features == model.backbone.feature_dim + 432
    ft = json.loads((colour_runs / "cnn-ft" / "config.json").read_text())
    assert ft["summary"]["init_head"].startswith("linear probe")  # LP-then-FT from the colour probe's head
    # the probe and the fine-tune share one colour store of the training + validation rows
    stores = list((colour_runs / ".cache").glob("colour-*"))
    assert len(stores) == 1
    n_rows = len(ds.split_indices("train")) + len(ds.split_indices("val"))
    assert json.loads((stores[0] / "meta.json").read_text())["n"] == n_rows


def test_the_probe_head_is_trained_on_features_then_histograms(colour_runs, tiny_data):
    """The cached colour rows are what the model computes, and the probe's head, scored on the cached validation
    rows [features, histograms], gives the validation mAP its sweep selected it by."""
    ds = load_dataset(tiny_data)
    model, cfg, decision = R.load_run(colour_runs / "cnn-probe", ds)
    cache = colour_runs / ".cache"
    f = np.asarray(shards.load(next(cache.glob("features-*")) / "features"), np.float32)
    c = np.asarray(shards.load(next(cache.glob("colour-*")) / "colour"), np.float32)
    rows = np.load(next(cache.glob("colour-*")) / "rows.npy")
    assert f.shape[1] == model.backbone.feature_dim  # the features store is the plain one, shared
    prep = Preprocess.from_config(cfg["preprocess"], "cpu")
    images = load_cache(ds, cfg["preprocess"]["cache_size"])
    with torch.no_grad():
        np.testing.assert_allclose(c[:16], model.side(prep(images[rows[:16]])).numpy(), atol=2e-3)
        n = cfg["dataset"]["n_train_used"]
        shift = torch.tensor(cfg["decision"]["bias_shift"], dtype=torch.float32)  # the logit adjustment, taken out
        z = model.head(torch.from_numpy(np.concatenate([f[n:], c[n:]], 1))) - shift
    y_val = ds.labels()[ds.split_indices("val")]
    got = batched_macro_ap(torch.as_tensor(y_val), tag_scores(z[None], decision.groups))[0]
    assert got == pytest.approx(cfg["summary"]["selected"]["val_map"], abs=1e-5)


def test_histograms_of_a_full_size_image_sample_a_strided_grid():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    img[:, :3] = img[:, -3:] = img[:3] = img[-3:] = 255  # a white border: the background
    got = ColourHistogram(ColourConfig(), MEAN, STD)(normalised(img))[0].numpy()
    grid = img[::4, ::4].reshape(-1, 3).astype(np.int64)  # 224 // 56 = every 4th pixel
    border = np.concatenate([img[::4, ::4][0], img[::4, ::4][-1], img[::4, ::4][:, 0], img[::4, ::4][:, -1]])
    fg = np.abs(grid - np.sort(border, 0)[(len(border) - 1) // 2]).sum(1) / 255 > 0.15
    q = np.minimum(grid * 6 // 255, 5)  # bins of v / 255 in [0, 1], the last closed
    code = (q[:, 0] * 6 + q[:, 1]) * 6 + q[:, 2]
    want = [np.bincount(code[m], minlength=216) / m.sum() for m in (np.ones(len(grid), bool), fg)]
    np.testing.assert_allclose(got, np.sqrt(np.concatenate(want)), atol=1e-3)


def test_a_colour_fine_tune_with_views_and_crt(tiny_data, tmp_path):
    """Colour histograms through the cached views (one colour store per view) and the cRT head."""
    for strategy in ("probe", "ft"):
        R.train_pair(tiny_data, tmp_path, tiny_options("cnn", strategy, colour=True, aug_views=1, rebalance="crt"))
    model, cfg, _ = R.load_run(tmp_path / "cnn-ft")
    assert model.head.in_features == model.backbone.feature_dim + 432 and cfg["summary"]["crt"]
    assert len(list((tmp_path / ".cache").glob("colour-*"))) == 1  # the originals'; the view has its own:
    views = [json.loads((d / "meta.json").read_text()) for d in (tmp_path / ".cache").glob("view-*")]
    assert sorted(v["outputs"][0] for v in views) == ["colour", "features", "trunk"]
    timing = json.loads((tmp_path / "cnn-ft" / "timing.json").read_text())["seconds"]
    assert timing["colour_extraction"] == 0.0  # the probe filled the colour stores in its own passes
    probe = json.loads((tmp_path / "cnn-probe" / "timing.json").read_text())["seconds"]
    assert probe["colour_extraction"] == 0.0  # ... with its features, so their seconds are counted once, there


def test_a_colour_pass_of_its_own_is_counted_in_the_training_time(tiny_data, tmp_path):
    R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe"))  # the features store, without colour
    R.train_pair(tiny_data, tmp_path, tiny_options("cnn", "probe", colour=True))  # reuses it: a colour-only pass
    store = next((tmp_path / ".cache").glob("colour-*"))
    meta = json.loads((store / "meta.json").read_text())
    assert meta["pass"] == ["colour"] and meta["seconds"] > 0
    timing = json.loads((tmp_path / "cnn-probe" / "timing.json").read_text())
    assert timing["seconds"]["colour_extraction"] == pytest.approx(meta["seconds"], abs=1e-3)
    assert timing["caches_reused"]["features"] is True


def test_the_ablation_refuses_a_colour_run(colour_runs, tiny_data):
    from bakeoff.evaluate.ablation import ablate_all
    result = ablate_all(colour_runs, tiny_data, pairs=["cnn-probe"], log=lambda s: None)["cnn-probe"]
    assert result["status"] == "refused" and "colour histograms" in result["reason"]


def test_a_fine_tune_does_not_start_from_a_probe_without_histograms(tiny_runs, tiny_data, tmp_path):
    import shutil
    shutil.copytree(tiny_runs / "cnn-probe", tmp_path / "cnn-probe")  # trained without --colour
    cfg = json.loads((tmp_path / "cnn-probe" / "config.json").read_text())
    why = R.probe_mismatch(tmp_path / "cnn-probe", cfg["backbone"], cfg["weights"], cfg["dataset"]["hash"],
                           "field", colour=True)
    assert "colour histograms no (this fine-tune: yes)" in why
    assert R.probe_mismatch(tmp_path / "cnn-probe", cfg["backbone"], cfg["weights"], cfg["dataset"]["hash"],
                            "field") == ""


def test_colour_is_an_option_that_makes_a_run_stale(tiny_runs):
    cfg = json.loads((tiny_runs / "cnn-probe" / "config.json").read_text())
    opts = tiny_options("cnn", "probe")
    spec = get_spec("cnn", opts.model, opts.image_size)
    weights = "random"
    old = recorded(cfg)
    assert "colour True -> False" not in changes(old, expected(opts, spec, weights, cfg["dataset"]["hash"]))
    assert "colour False -> True" in changes(old, expected(tiny_options("cnn", "probe", colour=True), spec, weights,
                                                           cfg["dataset"]["hash"]))
    del cfg["options"]["colour"]  # a run recorded before the option: trained without colour
    assert recorded(cfg)["colour"] is False


def test_the_onnx_export_computes_the_histograms_as_pytorch_does(colour_runs, tiny_data, tmp_path):
    import onnxruntime as ort

    from bakeoff.export.fp16 import convert_fp16
    from bakeoff.export.onnx_export import export_onnx
    from bakeoff.export.parity import DEFAULT_TOLERANCES, compare, judge, ort_logits, parity_inputs, torch_logits
    path = export_onnx(colour_runs / "cnn-probe", tmp_path / "model.onnx")
    model, cfg, decision = R.load_run(colour_runs / "cnn-probe")
    size = cfg["preprocess"]["img_size"]
    x = torch.from_numpy(np.random.default_rng(1).uniform(-2, 2, (5, 3, size, size)).astype(np.float32))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)
    # the FP16 graph (histograms included) passes the FP16 parity check on the dataset's images
    ds = load_dataset(tiny_data)
    _, inputs = parity_inputs(ds, cfg, 64)
    half = convert_fp16(path, tmp_path / "model_fp16.onnx")
    assert half["violations"] == []
    stats = compare(torch_logits(model, inputs), ort_logits(tmp_path / "model_fp16.onnx", inputs), decision)
    assert judge(stats, DEFAULT_TOLERANCES["fp16"]) == []
