"""The Setup section's protocol facts: token grids, resolution handicaps, heads and tuning budgets."""
from bakeoff.reports import protocol


def cfg(family, px, arch, native=None, **extra):
    return {"family": family, "preprocess": {"img_size": px}, "backbone": {"arch": arch},
            **({"native_img_size": native} if native else {}), **extra}


def test_token_grid_for_vits_and_cnns():
    assert protocol.token_grid(cfg("dinov2", 112, "vit_small_patch14_dinov2")) == "8x8 patches of 14 px"
    assert protocol.token_grid(cfg("clip", 96, "ViT-B-32-quickgelu")) == "3x3 patches of 32 px"
    assert protocol.token_grid(cfg("cnn", 224, "efficientnet_lite0")) == "7x7 final feature map"


def test_resolution_note_names_different_and_reduced_sizes():
    configs = {"cnn-probe": cfg("cnn", 224, "efficientnet_lite0", 224),
               "dinov2-probe": cfg("dinov2", 112, "vit_small_patch14_dinov2", 224)}
    note = protocol.resolution_note(configs)
    assert "different input sizes (cnn 224 px, dinov2 112 px)" in note
    assert "Reduced below the model's native input size: dinov2-probe (112 px, native 224)" in note
    same = {"a": cfg("cnn", 224, "x", 224), "b": cfg("dinov2", 224, "vit_small_patch14_dinov2", 224)}
    assert protocol.resolution_note(same) == ""


def test_head_and_tuning_text():
    c = cfg("cnn", 224, "x", strategy="probe", head={"kind": "field", "groups": {"colour": 5, "type": 9}, "loss": "bce"},
            decision={"logit_adjust_tau": 0.5, "free_tags": 3, "threshold_shrink": 10.0},
            summary={"tuning": {"trials": 8, "searched": "weight decay", "grid": [0.001, 30.0]},
                     "selected": {"weight_decay": 0.362}})
    assert protocol.head_text(c) == ("bce loss; softmax over 2 single-valued fields (colour, type), arg-max, logit "
                                     "adjustment tau 0.5; 3 sigmoid tags with validation thresholds shrunk to their "
                                     "bucket (strength 10)")
    assert protocol.tuning_text(c) == "8 trials: weight decay on [0.001 .. 30], selected 0.362"
    assert protocol.head_text(c | {"colour": {"bins": 6, "dim": 432}}) == (
        "head input: pooled features + 432 colour-histogram numbers; " + protocol.head_text(c))
    ft = cfg("cnn", 224, "x", strategy="ft", summary={
        "tuning": {"trials": 3, "searched": "block learning rate", "grid": [1e-4, 3e-4, 9e-4]}, "finetune": {"lr": 1e-4}})
    assert protocol.tuning_text(ft) == ("3 trials: block learning rate on [0.0001 .. 0.0009], selected 0.0001 (the "
                                        "grid's lowest: the best may lie beyond it)")
    assert protocol.budget_note({"p": c, "q": {"summary": {"tuning": {"trials": 1}}}}).startswith(
        "Tuning budgets differ between pairs (p: 8, q: 1 trials)")
    assert protocol.budget_note({"p": c}) == ""
