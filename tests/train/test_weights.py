"""Weights come through timm/open_clip from the hub or local files; never silently random."""
import pytest
import torch
from safetensors.torch import load_file

from bakeoff.train import weights as W
from bakeoff.train.registry import get_spec
from tests.conftest import SHARED_WEIGHTS, needs_shared


def test_pretrained_without_hub_or_file_fails_naming_model_and_dirs(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("hub unreachable")

    monkeypatch.setattr(W, "_library_model", lambda spec, kind, file: offline() if kind == "hub" else None)
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    with pytest.raises(W.WeightsNotFound) as e:
        W.create_backbone(get_spec("cnn", "resnet50"), "pretrained", tmp_path)
    msg = str(e.value)
    assert "resnet50" in msg and str(tmp_path) in msg and "hub unreachable" in msg and "--weights random" in msg


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(W.WeightsNotFound, match="does not exist"):
        W.create_backbone(get_spec("cnn", "mobilenetv2_100"), str(tmp_path / "nope.safetensors"))


def test_random_is_flagged():
    _, info = W.create_backbone(get_spec("cnn", "mobilenetv2_100", 32), "random")
    assert info.is_random and "not a valid comparison" in info.to_dict()["warning"]


def test_local_file_lookup_prefers_exact_tag(tmp_path, monkeypatch):
    spec = get_spec("cnn", "efficientnet_lite0")
    (tmp_path / "efficientnet_lite0.other.safetensors").write_bytes(b"")
    assert W.find_local_weights(spec, [tmp_path]).name == "efficientnet_lite0.other.safetensors"
    (tmp_path / "efficientnet_lite0.in1k.safetensors").write_bytes(b"")
    assert W.find_local_weights(spec, [tmp_path]).name == "efficientnet_lite0.in1k.safetensors"
    monkeypatch.setenv(W.WEIGHTS_ENV, str(tmp_path))
    assert W.weights_dirs(None) == [tmp_path]


@needs_shared(SHARED_WEIGHTS)
def test_local_timm_weights_load_through_timm():
    spec = get_spec("cnn", "efficientnet_lite0", 64)
    backbone, info = W.create_backbone(spec, "pretrained", SHARED_WEIGHTS)
    assert info.kind == "file" and info.sha256 and len(info.sha256) == 64
    ref = load_file(str(SHARED_WEIGHTS / "efficientnet_lite0.in1k.safetensors"))
    torch.testing.assert_close(backbone.model.conv_stem.weight, ref["conv_stem.weight"].float())


@needs_shared(SHARED_WEIGHTS)
def test_dinov2_position_embedding_resized_once_with_plain_bicubic():
    from timm.layers import resample_abs_pos_embed

    backbone, _ = W.create_backbone(get_spec("dinov2", img_size=112), "pretrained", SHARED_WEIGHTS)
    m = backbone.model
    assert m.patch_embed.grid_size == (8, 8) and m.pos_embed.shape[1] == 1 + 64
    raw = load_file(str(next(SHARED_WEIGHTS.glob("vit_small_patch14_dinov2.*.safetensors"))))["pos_embed"].float()
    plain = resample_abs_pos_embed(raw, new_size=[8, 8], old_size=[37, 37], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(m.pos_embed.data, plain)


def test_plan_weights_says_where_weights_come_from_without_loading(tmp_path, monkeypatch, capsys):
    from bakeoff.train.__main__ import main

    monkeypatch.setattr(W, "in_hub_cache", lambda spec: False)
    monkeypatch.setattr(W, "hub_unreachable", lambda: "the hub is off (test)")
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    spec = get_spec("dinov2")
    local = tmp_path / f"{spec.arch}.some_tag.safetensors"
    local.write_bytes(b"")
    assert W.plan_weights(spec, "auto", tmp_path) == W.WeightsPlan("file", str(local), f"local file {local}")
    clip = get_spec("clip")
    auto = W.plan_weights(clip, "auto", tmp_path)
    assert auto.kind == "random" and str(tmp_path) in auto.why and clip.hub_id in auto.why
    assert "the hub is off (test)" in auto.why
    assert W.plan_weights(clip, "pretrained", tmp_path).kind == "hub"  # a download: fails later if offline
    assert W.plan_weights(clip, "random").kind == "random"
    assert main(["--all", "--plan-weights", "--weights", "auto", "--weights-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()[-3:]  # the weights come last, after the profile
    assert [line.split()[0] for line in lines] == ["cnn", "dinov2", "clip"]
    assert "pretrained, local file" in lines[1] and W.RANDOM_FLAG in lines[2] and W.RANDOM_FLAG in lines[0]


README_LIKE_SHARED = """# Pretrained backbone weights available offline

| file | timm arch | pretraining | notes |
|---|---|---|---|
| `efficientnet_lite0.in1k.safetensors` | `efficientnet_lite0` | supervised | 4.7M params; checked |
| `mobilenetv2_100.mine.safetensors` | `mobilenetv2_100` | a saliency model's | \
trunk a \\| b; frozen or not is not known: label it "MobileNetV2 (derived)" |

No CLIP weights here.
"""


def _weights_dir(tmp_path, readme: str | None = README_LIKE_SHARED):
    """``tmp_path`` holding a real (random) MobileNetV2 weights file, and ``readme`` beside it."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    file = tmp_path / "mobilenetv2_100.mine.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("mobilenetv2_100", num_classes=0).state_dict().items()},
              str(file))
    if readme is not None:
        (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    return file


def test_provenance_note_and_label_come_from_the_readme_row_naming_the_file(tmp_path):
    (tmp_path / "README.md").write_text(README_LIKE_SHARED, encoding="utf-8")
    derived = W.read_provenance(tmp_path / "mobilenetv2_100.mine.safetensors")
    assert derived == W.Provenance('trunk a | b; frozen or not is not known: label it "MobileNetV2 (derived)"',
                                   "MobileNetV2 (derived)")
    assert W.read_provenance(tmp_path / "efficientnet_lite0.in1k.safetensors") == W.Provenance("4.7M params; checked")
    assert W.read_provenance(tmp_path / "in1k.safetensors") is None  # a part of a name is not the name
    assert W.label_in_note("label it “X (derived)”") == "X (derived)" and W.label_in_note("no label") is None


def test_sidecar_wins_over_readme_and_a_bad_sidecar_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text(README_LIKE_SHARED, encoding="utf-8")
    file = tmp_path / "mobilenetv2_100.mine.safetensors"
    sidecar = tmp_path / "mobilenetv2_100.mine.safetensors.json"
    sidecar.write_text('{"note": "from the sidecar", "label": "MobileNetV2 (sidecar)"}')
    assert W.read_provenance(file) == W.Provenance("from the sidecar", "MobileNetV2 (sidecar)")
    sidecar.write_text('{"notes": "misspelt"}')
    with pytest.raises(ValueError, match="note"):
        W.read_provenance(file)


def test_weights_without_a_note_keep_the_old_config_dict(tmp_path, monkeypatch):
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    file = _weights_dir(tmp_path, readme=None)
    _, info = W.create_backbone(get_spec("cnn", "mobilenetv2_100", 32), "auto", tmp_path)
    assert info.provenance is None and set(info.to_dict()) == {"kind", "source", "sha256"}
    assert info.to_dict()["source"] == str(file.resolve())


def test_a_derived_file_label_reaches_the_run_config_and_the_pair_label(tmp_path, monkeypatch):
    from bakeoff.reports.artifacts import Document, Pair, pair_label

    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    _weights_dir(tmp_path)
    spec = get_spec("cnn", "mobilenetv2_100", 32)
    plan = W.plan_weights(spec, "auto", tmp_path)
    assert plan.provenance.label == "MobileNetV2 (derived)"
    assert '(label: "MobileNetV2 (derived)")' in plan.describe(spec)
    _, info = W.create_backbone(spec, "auto", tmp_path)
    weights = info.to_dict()
    assert weights["label"] == "MobileNetV2 (derived)" and "frozen or not is not known" in weights["note"]

    def pair(weights: dict) -> Pair:
        doc = {"family": "cnn", "strategy": "ft", "weights": weights}
        return Pair("cnn-ft", tmp_path, Document("cnn-ft/config.json", doc), None, {}, [], {})

    assert pair_label(pair(weights)) == "MobileNetV2 (derived) fine-tune"
    assert pair_label(pair({"kind": "file", "source": "x", "sha256": None})) == "CNN fine-tune"  # an older config


@needs_shared(SHARED_WEIGHTS)
def test_the_shared_dinov2_file_is_labelled_derived():
    spec = get_spec("dinov2")
    plan = W.plan_weights(spec, "pretrained", SHARED_WEIGHTS)
    assert plan.kind == "file" and plan.provenance.label == "DINOv2 ViT-S/14 (derived)"
    assert "frozen or fine-tuned" in plan.provenance.note
