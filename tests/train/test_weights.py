"""Weights come through timm/open_clip from the hub or local files; never silently random."""
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import SHARED_WEIGHTS, needs_shared
from train import weights as W
from train.registry import get_spec


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
    from train.__main__ import main

    monkeypatch.setattr(W, "in_hub_cache", lambda spec: False)
    monkeypatch.delenv(W.WEIGHTS_ENV, raising=False)
    spec = get_spec("dinov2")
    local = tmp_path / f"{spec.arch}.some_tag.safetensors"
    local.write_bytes(b"")
    assert W.plan_weights(spec, "auto", tmp_path) == W.WeightsPlan("file", str(local), f"local file {local}")
    clip = get_spec("clip")
    auto = W.plan_weights(clip, "auto", tmp_path)
    assert auto.kind == "random" and str(tmp_path) in auto.why and clip.hub_id in auto.why
    assert W.plan_weights(clip, "pretrained", tmp_path).kind == "hub"  # a download: fails later if offline
    assert W.plan_weights(clip, "random").kind == "random"
    assert main(["--all", "--plan-weights", "--weights", "auto", "--weights-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["cnn", "dinov2", "clip"]
    assert "pretrained, local file" in lines[1] and W.RANDOM_FLAG in lines[2] and W.RANDOM_FLAG in lines[0]
