"""Training profiles: settings, explicit overrides, reductions against full, the default image cache."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from bakeoff.train import profiles as P
from bakeoff.train.probe import ProbeConfig
from bakeoff.train.registry import DEFAULTS, FAMILIES, get_spec

PATCH = {"dinov2": 14, "clip": 32}  # ViT patch sizes of the registry defaults


def test_families_agree_with_the_registry_and_no_torch_is_imported():
    assert P.FAMILIES == FAMILIES
    code = "import sys, train.profiles, train.project; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"  # the main job (reports) imports these without model code


def test_full_is_native_sizes_default_schedules_and_no_reductions():
    r = P.resolve(P.PROFILES["full"].settings)
    assert r.model == DEFAULTS and r.image_size == {f: get_spec(f).img_size for f in FAMILIES}
    assert r.max_train_images is None and r.cache_size == max(r.image_size.values())
    assert P.reductions(P.PROFILES["full"], r) == []


@pytest.mark.parametrize("name", ["cpu", "demo"])
def test_reduced_profiles_list_every_reduction_with_its_reason(name):
    profile = P.PROFILES[name]
    r = P.resolve(profile.settings)
    lines = P.reductions(profile, r)
    assert lines and not any(line.endswith(P.EXPLICIT) for line in lines)  # each has the profile's own reason
    for fam, px in profile.settings.image_size.items():
        native = r.full[f"image_size.{fam}"]
        assert any(line.startswith(f"{fam} input {px} px instead of {native} px") for line in lines)
        if fam in PATCH:
            assert px % PATCH[fam] == 0, f"{name}: {fam} at {px} px is not a multiple of its {PATCH[fam]} px patch"
    assert r.cache_size == max(r.image_size.values())  # the cache follows the inputs
    text = P.describe(profile, r, lines)
    assert text.startswith(f"profile {name}:") and all(f"  - {line}" in text for line in lines)


def test_demo_keeps_the_embedded_defaults():
    r = P.resolve(P.PROFILES["demo"].settings)
    assert (r.image_size, r.model["cnn"], r.epochs, r.probe_epochs, r.cache_size) == (
        {"cnn": 64, "dinov2": 56, "clip": 64}, "efficientnet_lite0", 2, ProbeConfig.epochs, 64)


def test_explicit_flags_override_the_profile_and_are_listed():
    profile = P.PROFILES["cpu"]
    explicit = P.settings_from_flags(None, ["clip=96"], 4, None, None, None)
    r = P.resolve(profile.settings.merged(explicit))
    assert r.image_size == {"cnn": 112, "dinov2": 112, "clip": 96} and r.epochs == 4 and r.max_train_images == 12_000
    lines = P.reductions(profile, r)
    assert f"clip input 96 px instead of 224 px (ViT-B-32's native size): {P.EXPLICIT}" in lines
    assert f"fine-tune 4 epochs instead of 5: {P.EXPLICIT}" in lines
    assert any(line.startswith("training subset: at most 12,000") and not line.endswith(P.EXPLICIT) for line in lines)


def test_a_cache_below_an_input_is_a_reduction_and_a_warning():
    r = P.resolve(P.Settings(image_size=dict.fromkeys(FAMILIES, 224), cache_size=128))
    assert "image cache 128 px instead of 224 px (the grid's largest input): larger inputs see upsampled images: " \
           f"{P.EXPLICIT}" in P.reductions(P.PROFILES["full"], r)
    assert "224 px exceeds the 128 px image cache" in P.cache_warning(224, 128)
    assert P.cache_warning(224, 224) is None and P.cache_warning(112, 224) is None


def test_settings_round_trip_through_json_and_train_flags():
    s = P.Settings(model={"cnn": "efficientnet_lite0"}, image_size={"cnn": 112, "clip": 128}, epochs=3,
                   max_train_images=500)
    assert P.Settings.from_dict(json.loads(json.dumps(asdict(P.Settings().merged(s))))) == s
    argv = s.argv()
    assert argv == ["--model", "cnn=efficientnet_lite0", "--image-size", "cnn=112", "--image-size", "clip=128",
                    "--epochs", "3", "--max-train-images", "500"]
    from bakeoff.train.__main__ import parser

    a = parser().parse_args(["--all", *argv])
    assert P.settings_from_flags(a.model, a.image_size, a.epochs, a.probe_epochs, a.max_train_images,
                                 a.cache_size) == s


def test_a_bare_value_sets_only_the_families_asked_for():
    assert P.per_family(["112"], "--image-size", ("cnn",)) == {"cnn": "112"}
    assert P.per_family(["112", "clip=128"], "--image-size") == {"cnn": "112", "dinov2": "112", "clip": "128"}
    with pytest.raises(SystemExit, match="--image-size"):
        P.settings_from_flags(None, ["big"], None, None, None, None)
