"""The registry's stem/tail split reproduces each library model's own forward, and tunes the last 4 blocks."""
import pytest
import torch

from bakeoff.train.registry import DEFAULTS, REGISTRY, TaggingModel, get_spec, list_models
from bakeoff.train.weights import create_backbone
from tests.conftest import TINY_MODELS


def test_each_family_has_default_and_other_variants():
    for family, default in DEFAULTS.items():
        names = list_models(family)
        assert default in names and len(names) >= 2


def test_get_spec_errors_name_the_choices():
    with pytest.raises(ValueError, match="unknown backbone family"):
        get_spec("vgg")
    with pytest.raises(ValueError, match="belongs to family 'cnn'"):
        get_spec("clip", "resnet50")
    assert get_spec("dinov2", img_size=112).img_size == 112


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_stem_tail_equals_library_forward(family):
    name, size = TINY_MODELS[family]
    backbone, info = create_backbone(get_spec(family, name, size), "random")
    assert info.is_random
    backbone.eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        split = backbone.tail(backbone.stem(x))
        if family == "clip":
            ref = backbone.visual(x)
        elif family == "dinov2":  # DINOv2 linear-eval pooling: CLS concatenated with the mean patch token
            tokens = backbone.model.forward_features(x)
            ref = torch.cat([tokens[:, 0], tokens[:, backbone.model.num_prefix_tokens:].mean(1)], -1)
        else:
            ref = backbone.model(x)
    assert split.shape == (3, backbone.feature_dim)
    torch.testing.assert_close(split, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,blocks", [("cnn", "blocks"), ("dinov2", "blocks"), ("clip", "resblocks")])
def test_tuned_modules_are_the_last_four_blocks(family, blocks):
    name, size = TINY_MODELS[family]
    backbone, _ = create_backbone(get_spec(family, name, size), "random")
    tuned = backbone.tuned_modules()
    if family == "dinov2":
        assert tuned[:4] == list(backbone.model.blocks[-4:]) and tuned[4] is backbone.model.norm
    elif family == "clip":
        assert tuned[:4] == list(backbone.visual.transformer.resblocks[-4:]) and tuned[4] is backbone.visual.ln_post
    else:  # MobileNetV2: the last 4 inverted-residual blocks of the flattened stage list + conv_head/bn2
        flat = [b for stage in backbone.model.blocks for b in stage]
        assert tuned[:4] == flat[-4:]
        assert tuned[4] is backbone.model.conv_head and tuned[5] is backbone.model.bn2


def test_resnet_last_four_blocks_are_layer3_last_and_layer4():
    backbone, _ = create_backbone(get_spec("cnn", "resnet50", 32), "random")
    m = backbone.model
    assert backbone.tuned_modules() == [m.layer3[-1], *m.layer4]


def test_tagging_model_outputs_one_logit_per_tag():
    name, size = TINY_MODELS["cnn"]
    backbone, _ = create_backbone(get_spec("cnn", name, size), "random")
    model = TaggingModel(backbone, 7).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)
    assert set(REGISTRY) >= set(DEFAULTS.values())
