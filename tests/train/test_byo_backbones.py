"""Bring your own backbone: any timm / open_clip name gets a spec from the library's own pretrained config and
a stem/tail split found from the model's structure that reproduces the library's own features (random
weights, tiny inputs, offline)."""
import json
import re
from dataclasses import replace

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from bakeoff.train import weights as W
from bakeoff.train.registry import REGISTRY, get_spec, wrap
from bakeoff.train.weights import create_backbone


def test_timm_name_takes_its_preprocessing_from_timms_pretrained_cfg():
    spec = get_spec("cnn", "convnext_tiny.fb_in22k")
    cfg = timm.models.get_pretrained_cfg("convnext_tiny.fb_in22k")
    assert (spec.library, spec.arch, spec.pretrained_tag, spec.hub_id) == (
        "timm", "convnext_tiny", "fb_in22k", "convnext_tiny.fb_in22k")
    assert (spec.mean, spec.std, spec.interpolation, spec.img_size) == (cfg.mean, cfg.std, "bicubic", 224)
    vit = get_spec("cnn", "vit_small_patch16_224.augreg_in21k", 64)
    assert vit.mean == vit.std == (0.5, 0.5, 0.5) and vit.img_size == 64
    # no tag: timm's default one, so that the weights asked for are named
    default_tag = timm.models.get_pretrained_cfg("efficientnet_b0").tag
    assert get_spec("cnn", "efficientnet_b0").hub_id == f"efficientnet_b0.{default_tag}"


def test_open_clip_name_takes_its_preprocessing_from_open_clip():
    spec = get_spec("clip", "ViT-B-16:laion2b_s34b_b88k")
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")
    assert (spec.library, spec.arch, spec.pretrained_tag, spec.hub_id, spec.pool) == (
        "open_clip", "ViT-B-16", "laion2b_s34b_b88k", "ViT-B-16:laion2b_s34b_b88k", "clip")
    assert (spec.mean, spec.std, spec.interpolation, spec.img_size) == (
        cfg["mean"], cfg["std"], cfg["interpolation"], 224)
    siglip = get_spec("clip", "ViT-B-16-SigLIP:webli")
    assert siglip.mean == siglip.std == (0.5, 0.5, 0.5)


def test_a_registry_name_wins_and_the_family_picks_which_library_is_asked_first():
    assert get_spec("cnn", "convnext_tiny") is REGISTRY["convnext_tiny"]
    assert get_spec("clip", "ViT-B-16") is REGISTRY["ViT-B-16"]
    assert get_spec("cnn", "convnext_base").library == "timm"  # both libraries have a convnext_base
    assert get_spec("clip", "convnext_base").library == "open_clip"
    assert get_spec("cnn", "ViT-B-32:laion2b_s34b_b79k").library == "open_clip"
    assert get_spec("clip", "vit_base_patch16_clip_224.openai").library == "timm"


def test_unknown_names_and_tags_are_refused_saying_where_to_find_names():
    with pytest.raises(ValueError, match=r"unknown model 'no_such_net'.*timm\.list_models.*open_clip\.list_pretrained"):
        get_spec("cnn", "no_such_net")
    with pytest.raises(ValueError, match=r"timm convnext_tiny has no pretrained tag 'bogus'.*fb_in22k"):
        get_spec("cnn", "convnext_tiny.bogus")
    with pytest.raises(ValueError, match=r"open_clip ViT-B-16 has no pretrained tag 'bogus'.*laion2b_s34b_b88k"):
        get_spec("clip", "ViT-B-16:bogus")


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050",
                                  "regnetx_002", "gernet_s", "vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_split_reproduces_the_pooled_pre_logits_and_tunes_all_of_the_tail(name):
    size = 32
    backbone, info = create_backbone(get_spec("cnn", name, size), "random")
    assert info.is_random
    backbone.eval()
    m = backbone.model
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        h = backbone.stem(x)
        ref = m.forward_head(m.forward_features(x), pre_logits=True)
    split = backbone.tail(h)
    assert split.shape == (2, backbone.feature_dim)
    torch.testing.assert_close(split, ref, rtol=1e-4, atol=1e-4)
    split.square().sum().backward()  # the tail's trained parameters are exactly the tuned modules'
    with_grad = {id(p) for p in m.parameters() if p.grad is not None}
    assert with_grad == {id(p) for mod in backbone.tuned_modules() for p in mod.parameters()}
    assert backbone.describe_split().endswith("(4 blocks)")


@pytest.mark.parametrize("name,split", [
    ("efficientnet_b0", "stem: conv_stem..blocks[5][0]; tuned: blocks[5][1..3], blocks[6][0], conv_head, bn2 "
                        "(4 blocks)"),
    ("resnet18", "stem: conv1..layer2[1]; tuned: layer3[0..1], layer4[0..1] (4 blocks)"),
    ("convnext_atto", "stem: stem..stages[2].blocks[3]; tuned: stages[2].blocks[4..5], stages[3].downsample, "
                      "stages[3].blocks[0..1], norm_pre, head (4 blocks)"),
    ("vit_tiny_patch16_224", "stem: patch_embed..blocks[7]; tuned: blocks[8..11], norm (4 blocks)"),
])
def test_describe_split_names_the_frozen_and_the_tuned_modules(name, split):
    backbone, _ = create_backbone(get_spec("cnn", name, 32), "random")
    assert backbone.describe_split() == split
    if name == "resnet18":
        assert backbone.tuned_modules() == [*backbone.model.layer3, *backbone.model.layer4]


def test_dinov2_family_pools_cls_and_the_mean_patch_token_after_register_tokens():
    spec = get_spec("dinov2", "vit_small_patch14_reg4_dinov2.lvd142m", 28)
    assert (spec.pool, spec.interpolation) == ("cls+mean", "bicubic")
    backbone, _ = create_backbone(spec, "random")
    backbone.eval()
    m = backbone.model
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = m.forward_features(x)
        ref = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)  # CLS, 4 registers, 4 patches
        torch.testing.assert_close(backbone(x), ref, rtol=1e-4, atol=1e-4)
    assert m.num_prefix_tokens == 5 and backbone.feature_dim == 2 * m.embed_dim


def test_a_vit_found_by_structure_is_built_for_the_run_size():
    spec = get_spec("cnn", "deit_tiny_patch16_224", 32)  # a VisionTransformer whose name does not start with vit_
    torch.manual_seed(0)
    model = W._timm_model(spec, pretrained=False, file=None)
    torch.manual_seed(0)
    direct = timm.create_model("deit_tiny_patch16_224", num_classes=0, img_size=32)
    assert model.patch_embed.grid_size == (2, 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))


def test_a_vit_from_a_weights_file_gets_its_position_embedding_resized(tmp_path):
    native = timm.create_model("deit_tiny_patch16_224", num_classes=0)
    file = tmp_path / "deit_tiny_patch16_224.mine.safetensors"
    save_file(native.state_dict(), str(file))
    model = W._timm_model(get_spec("cnn", "deit_tiny_patch16_224", 32), pretrained=True, file=file)
    assert model.pos_embed.shape == (1, 1 + 2 * 2, native.embed_dim)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, native.blocks[0].attn.qkv.weight)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class _SkipNet(nn.Module):
    """Looks like stages of blocks, but forward_features adds its stem's output back: no chain reproduces it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.stages = nn.Sequential(*(nn.Sequential(_Block(), _Block()) for _ in range(3)))

    def forward_features(self, x):
        x = self.stem(x)
        return self.stages(x) + x

    def forward_head(self, x, pre_logits=False):
        return x.mean((2, 3))


@pytest.mark.parametrize("name,why", [("densenet121", "found 0 blocks, need 4"),
                                      ("cspresnet50", "RuntimeError")])  # cross-stage concat: not a chain
def test_a_timm_model_without_a_derivable_split_is_refused(name, why):
    refusal = rf"no stem/tail split for timm {name}\.\S+ \(\w+\): .*{why}.*looked for a timm ViT"
    with pytest.raises(ValueError, match=refusal):
        create_backbone(get_spec("cnn", name, 64), "random")


def test_a_split_that_does_not_reproduce_the_features_is_refused():
    spec = replace(get_spec("cnn", "resnet18"), img_size=8)
    split = re.escape("stem: stem..stages[0][1]; tuned: stages[1][0..1], stages[2][0..1] (4 blocks)")
    with pytest.raises(ValueError, match=rf"\(_SkipNet\): the split found from its structure \({split}\) does not"):
        wrap(spec, _SkipNet())


def test_open_clip_vit_split_reproduces_the_image_embedding():
    spec = get_spec("clip", "ViT-S-16", 32)  # not in the registry, no pretrained tag
    backbone, _ = create_backbone(spec, "random")
    backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.tail(backbone.stem(x)), backbone.visual(x), rtol=1e-4, atol=1e-4)
    assert backbone.describe_split() == ("stem: conv1..transformer.resblocks[7]; "
                                         "tuned: transformer.resblocks[8..11], ln_post, proj (4 blocks)")


def test_open_clip_modified_resnet_is_refused():
    from open_clip.modified_resnet import ModifiedResNet

    visual = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2, image_size=32, width=8)
    with pytest.raises(ValueError, match=r"no stem/tail split for open_clip RN50:openai \(ModifiedResNet\): "
                                         r".*not a VisionTransformer.*open_clip VisionTransformer"):
        wrap(get_spec("clip", "RN50:openai", 32), visual)


def test_an_openai_tag_builds_quick_gelu_with_or_without_its_weights():
    visual = W._open_clip_visual(get_spec("clip", "ViT-B-32:openai", 32), None)
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache: ``put(repo, file, doc)`` stores a JSON file of a hub repository."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    def put(repo: str, name: str, doc: dict) -> None:
        root = tmp_path / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text("0" * 40)
        snapshot = root / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(json.dumps(doc))

    return put


def test_hf_hub_ids_take_their_config_from_the_hub(hub_cache, tmp_path):
    hub_cache("me/tiny-resnet", "config.json", {"architecture": "resnet18", "num_classes": 10, "pretrained_cfg": {
        "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "input_size": [3, 96, 96], "interpolation": "bilinear"}})
    hub_cache("me/tiny-clip", "open_clip_config.json", {"model_cfg": open_clip.get_model_config("ViT-S-32"),
                                                         "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    spec = get_spec("cnn", "hf-hub:me/tiny-resnet")
    assert (spec.library, spec.hub_id, spec.img_size, spec.mean, spec.std, spec.interpolation) == (
        "timm", "hf-hub:me/tiny-resnet", 96, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear")
    backbone, _ = create_backbone(replace(spec, img_size=32), "random")
    assert backbone.tuned_modules() == [*backbone.model.layer3, *backbone.model.layer4]
    clip = get_spec("clip", "hf-hub:me/tiny-clip", 32)
    assert (clip.library, clip.hub_id, clip.mean, clip.std, clip.interpolation) == (
        "open_clip", "hf-hub:me/tiny-clip", (0.5,) * 3, (0.25,) * 3, "bicubic")
    trained = open_clip.create_model("ViT-S-32", force_image_size=32)
    file = tmp_path / "tiny-clip.safetensors"
    save_file(trained.state_dict(), str(file))
    backbone, info = create_backbone(clip, str(file))  # a file of the hub model's weights
    assert info.kind == "file"
    torch.testing.assert_close(backbone.visual.proj, trained.visual.proj, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"timm hf-hub:me/absent: its config.json is not reachable"):
        get_spec("cnn", "hf-hub:me/absent")
