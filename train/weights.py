"""Create backbones through timm / open_clip exactly as their users do, online or from local files.

Resolution for ``weights="pretrained"``: a local file named ``<arch>.<tag>.safetensors`` (or any
``<arch>.*.safetensors``) in ``weights_dir`` / ``$BAKEOFF_WEIGHTS`` is used first (an explicit local copy
needs no network round-trip, which on an offline machine costs ~50 s of retries); otherwise the library's
hub download. If neither works the build FAILS naming the model and where it looked. ``weights="random"``
is explicit and flagged; a path is loaded as that file. ``weights="auto"`` (the offline demo's choice) takes
pretrained weights wherever they are reachable without a download (local files, the hub cache) and otherwise
random init, flagged and announced. Nothing falls back to random silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from train.data.io import sha256_file
from train.registry import Backbone, BackboneSpec, wrap

WEIGHTS_ENV = "BAKEOFF_WEIGHTS"
RANDOM_FLAG = "random init — not a valid comparison"


class WeightsNotFound(RuntimeError):
    """Pretrained weights were asked for and none could be loaded."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from (recorded in every run's config)."""

    kind: str  # "hub" | "file" | "random"
    source: str  # hub id, file path, or "random"
    sha256: str | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "source": self.source, "sha256": self.sha256}
        if self.is_random:
            d["warning"] = RANDOM_FLAG
        return d


def weights_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs = [weights_dir, os.environ.get(WEIGHTS_ENV)]
    return [Path(d) for d in dirs if d]


def find_local_weights(spec: BackboneSpec, dirs: list[Path]) -> Path | None:
    """``<arch>.<tag>.safetensors`` if present, else the first ``<arch>.*.safetensors``, in ``dirs`` order."""
    for d in dirs:
        exact = d / f"{spec.arch}.{spec.pretrained_tag}.safetensors"
        if exact.is_file():
            return exact
        others = sorted(d.glob(f"{spec.arch}.*.safetensors"))
        if others:
            return others[0]
    return None


def _timm_model(spec: BackboneSpec, pretrained: bool, file: Path | None) -> nn.Module:
    import timm

    vit = spec.arch.startswith("vit_")
    kwargs: dict = {"num_classes": 0}
    if vit and not pretrained:
        kwargs["img_size"] = spec.img_size
    if file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
    name = f"{spec.arch}.{spec.pretrained_tag}" if pretrained and not file else spec.arch
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if vit and pretrained:
        # Loaded at the checkpoint's native grid; resize the position embedding once with plain bicubic
        # (DINOv2's own resize; timm's antialiased resize gives different tokens, see PITFALLS.md).
        set_vit_input_size(model, spec.img_size)
    return model


def set_vit_input_size(model: nn.Module, img_size: int) -> None:
    """Resize a timm ViT's input size and position embedding (plain bicubic, no antialias), once."""
    from timm.layers import resample_abs_pos_embed

    old_grid = model.patch_embed.grid_size
    model.patch_embed.set_input_size(img_size=img_size)
    new_grid = model.patch_embed.grid_size
    if new_grid == old_grid:
        return
    n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        pe = resample_abs_pos_embed(model.pos_embed.data, new_size=list(new_grid), old_size=list(old_grid),
                                    num_prefix_tokens=n_prefix, interpolation="bicubic", antialias=False)
    model.pos_embed = nn.Parameter(pe, requires_grad=model.pos_embed.requires_grad)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, img_size, img_size)}


def _open_clip_visual(spec: BackboneSpec, pretrained: str | None) -> nn.Module:
    import open_clip

    model = open_clip.create_model(spec.arch, pretrained=pretrained, force_image_size=spec.img_size,
                                   require_pretrained=pretrained is not None)
    return model.visual


def in_hub_cache(spec: BackboneSpec) -> bool:
    """Whether the library's hub checkpoint for ``spec`` is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        if spec.library == "timm":
            import timm

            repo = timm.models.get_pretrained_cfg(spec.hub_id).hf_hub_id
            files = ("model.safetensors", "pytorch_model.bin")
        else:
            import open_clip

            repo = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained_tag)["hf_hub"].rstrip("/")
            files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    except (AttributeError, KeyError, RuntimeError, TypeError):
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in files)


def _library_model(spec: BackboneSpec, kind: str, file: Path | None) -> nn.Module:
    if spec.library == "timm":
        return _timm_model(spec, pretrained=kind != "random", file=file)
    if spec.library == "open_clip":
        src = str(file) if file else (spec.pretrained_tag if kind == "hub" else None)
        return _open_clip_visual(spec, src)
    raise ValueError(f"unknown library {spec.library!r}")


@dataclass(frozen=True)
class WeightsPlan:
    """Where ``create_backbone`` will take a backbone's weights from, decided without loading anything."""

    kind: str  # "file" | "hub" | "random"
    source: str  # file path, hub id, or "random"
    why: str  # one line for people

    def describe(self, spec: BackboneSpec) -> str:
        if self.kind == "random":
            return f"{spec.family} {spec.name}: {RANDOM_FLAG} ({self.why})"
        return f"{spec.family} {spec.name}: pretrained, {self.why}"


def plan_weights(spec: BackboneSpec, weights: str = "pretrained",
                 weights_dir: str | os.PathLike | None = None) -> WeightsPlan:
    """The weights ``create_backbone(spec, weights, weights_dir)`` will load: local file, hub, or random init."""
    if weights == "random":
        return WeightsPlan("random", "random", "asked for")
    if weights not in ("pretrained", "auto"):
        return WeightsPlan("file", weights, f"file {weights}")
    dirs = weights_dirs(weights_dir)
    local = find_local_weights(spec, dirs)
    if local is not None:
        return WeightsPlan("file", str(local), f"local file {local}")
    if in_hub_cache(spec):
        return WeightsPlan("hub", spec.hub_id, f"{spec.hub_id} from the Hugging Face cache")
    looked = (f"no {spec.arch}.*.safetensors in {', '.join(map(str, dirs))}" if dirs
              else f"no --weights-dir and ${WEIGHTS_ENV} unset")
    if weights == "auto":
        return WeightsPlan("random", "random", f"no pretrained weights reachable offline: {looked}; "
                                               f"{spec.hub_id} not in the hub cache")
    return WeightsPlan("hub", spec.hub_id, f"{spec.hub_id} downloaded from the hub (needs network; {looked})")


def create_backbone(spec: BackboneSpec, weights: str = "pretrained", weights_dir: str | os.PathLike | None = None,
                    seed: int = 0) -> tuple[Backbone, WeightsInfo]:
    """Build ``spec`` with the requested weights (``plan_weights``); returns the backbone and their source."""
    torch.manual_seed(seed)
    plan = plan_weights(spec, weights, weights_dir)
    if plan.kind == "random":
        if weights == "auto":
            print(f"WARNING {plan.describe(spec)}")
        return wrap(spec, _library_model(spec, "random", None)), WeightsInfo("random", "random")
    if plan.kind == "file":
        path = Path(plan.source)
        if not path.is_file():
            raise WeightsNotFound(f"{spec.name}: weights file {path} does not exist")
        return wrap(spec, _library_model(spec, "file", path)), WeightsInfo("file", str(path.resolve()), sha256_file(path))
    try:
        model = _library_model(spec, "hub", None)
    except Exception as e:  # hub unreachable or no such tag
        raise WeightsNotFound(
            f"{spec.name}: no pretrained weights. Hub download of {spec.hub_id} via {spec.library} failed "
            f"({type(e).__name__}: {str(e)[:200]}); {plan.why}. "
            f"Pass --weights-dir DIR or --weights FILE, or --weights random (flagged: {RANDOM_FLAG})."
        ) from e
    return wrap(spec, model), WeightsInfo("hub", spec.hub_id)
