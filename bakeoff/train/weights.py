"""Create backbones through timm / open_clip exactly as their users do, online or from local files.

Resolution for ``weights="pretrained"``: a local file named ``<arch>.<tag>.safetensors`` (or any
``<arch>.*.safetensors``) in ``weights_dir`` / ``$BAKEOFF_WEIGHTS`` is used first (an explicit local copy
needs no network round-trip), then the Hugging Face hub cache, otherwise the library's hub download. If none
works the build FAILS naming the model and where it looked. ``weights="random"`` is explicit and flagged; a path
is loaded as that file. ``weights="auto"`` (the demo's choice) takes the same local file or hub cache, else a hub
download when the hub answers one quick probe (:func:`hub_unreachable`: none in offline mode), and otherwise
random init, flagged and announced; a download that fails falls back to random init, announced too. Nothing
falls back to random silently.

A weights file's provenance note (and the label it asks for) comes from a sidecar ``<file>.json`` or from the
row naming the file in its directory's README.md table (:func:`read_provenance`); it is recorded with the
weights in every run's config.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from bakeoff.common.io import sha256_file
from bakeoff.train.registry import Backbone, BackboneSpec, wrap

WEIGHTS_ENV = "BAKEOFF_WEIGHTS"
RANDOM_FLAG = "random init — not a valid comparison"
HUB_PROBE_TIMEOUT_S = 3.0  # one probe of the hub endpoint decides whether "auto" may download
README = "README.md"


class WeightsNotFound(RuntimeError):
    """Pretrained weights were asked for and none could be loaded."""


@dataclass(frozen=True)
class Provenance:
    """What a weights file's publisher says about it, and the label every result of it must carry."""

    note: str | None
    label: str | None = None  # e.g. "DINOv2 ViT-S/14 (derived)"

    def to_dict(self) -> dict:
        return {k: v for k, v in {"note": self.note, "label": self.label}.items() if v}


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from (recorded in every run's config)."""

    kind: str  # "hub" | "file" | "random"
    source: str  # hub id, file path, or "random"
    sha256: str | None = None
    provenance: Provenance | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def to_dict(self) -> dict:
        """The config's ``weights``; ``note`` / ``label`` only when the file has a provenance note."""
        d = {"kind": self.kind, "source": self.source, "sha256": self.sha256}
        if self.provenance is not None:
            d |= self.provenance.to_dict()
        if self.is_random:
            d["warning"] = RANDOM_FLAG
        return d


def read_provenance(path: Path) -> Provenance | None:
    """``path``'s provenance: the sidecar ``<file>.json`` ({"note": ..., "label": ...}) if present, else the
    notes cell of the row naming the file in the directory's README.md table; None when neither has one."""
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        doc = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not (doc.get("note") or doc.get("label")):
            raise ValueError(f"{sidecar}: expected a JSON object with a \"note\" and/or a \"label\"")
        return Provenance(doc.get("note"), doc.get("label"))
    readme = path.parent / README
    note = readme_note(readme.read_text(encoding="utf-8"), path.name) if readme.is_file() else None
    return Provenance(note, label_in_note(note)) if note else None


def readme_note(markdown: str, file_name: str) -> str | None:
    """The notes cell (the column headed "notes", else the last) of the first table row whose first cell
    names ``file_name``."""
    header: list[str] | None = None
    for line in markdown.splitlines():
        cells = _table_cells(line)
        if cells is None:
            header = None  # a table ends at its first non-row line
        elif header is None:
            header = [c.lower() for c in cells]
        elif file_name in cells[0].replace("`", " ").split():
            column = header.index("notes") if "notes" in header else len(header) - 1
            return cells[column] if column < len(cells) and cells[column] else None
    return None


def _table_cells(line: str) -> list[str] | None:
    """A markdown table row's cells (``\\|`` is a literal bar), None for any other line."""
    line = line.strip()
    if not line.startswith("|"):
        return None
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip("|"))]


def label_in_note(note: str | None) -> str | None:
    """X in a note that says ``label it "X"`` (straight or curly quotes)."""
    m = re.search(r'label it\s+["“]([^"”]+)["”]', note or "")
    return m.group(1) if m else None


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
    """``spec``'s timm model without classifier, for ``spec.img_size`` inputs. A ViT with an absolute position
    embedding (found by structure) built for another size gets it resized: pretrained, once with plain bicubic;
    random, rebuilt at that size from the same seed (the random init timm gives a ViT of that size)."""
    import timm

    kwargs: dict = {"num_classes": 0}
    if file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
    name = spec.hub_id if pretrained and not file else spec.arch
    rng = torch.get_rng_state()
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    patch_embed = getattr(model, "patch_embed", None)
    vit = isinstance(getattr(model, "pos_embed", None), nn.Parameter) and hasattr(patch_embed, "set_input_size")
    if not vit or tuple(getattr(patch_embed, "img_size", None) or ()) == (spec.img_size,) * 2:
        return model
    if pretrained:
        # Loaded at the checkpoint's native grid; resize the position embedding once with plain bicubic
        # (DINOv2's own resize; timm's antialiased resize gives different tokens, see PITFALLS.md).
        set_vit_input_size(model, spec.img_size)
        return model
    torch.set_rng_state(rng)
    return timm.create_model(name, pretrained=False, img_size=spec.img_size, **kwargs)


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
    """``spec``'s open_clip image tower at ``spec.img_size``; ``pretrained``: a tag or a file, None for random init.
    An ``hf-hub:`` model brings its weights (its tag is ""); a file is loaded into it. A tag trained with
    QuickGELU (OpenAI's) builds QuickGELU, with or without its weights."""
    import open_clip

    if spec.arch.startswith("hf-hub:"):
        model = open_clip.create_model(spec.arch, load_weights=pretrained == "", require_pretrained=pretrained == "",
                                       force_image_size=spec.img_size)
        if pretrained:
            open_clip.load_checkpoint(model, pretrained)
        return model.visual
    quick_gelu = bool(open_clip.get_pretrained_cfg(spec.arch, spec.pretrained_tag).get("quick_gelu"))
    model = open_clip.create_model(spec.arch, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                   force_image_size=spec.img_size, require_pretrained=pretrained is not None)
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


def hub_unreachable() -> str | None:
    """Why a hub download cannot happen now, None when the hub answers. Offline mode (``HF_HUB_OFFLINE``) sends
    nothing; otherwise one quick probe of the endpoint (``HF_ENDPOINT``), made once per endpoint and process, so
    an offline machine pays at most :data:`HUB_PROBE_TIMEOUT_S` instead of the libraries' retries."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "the Hugging Face hub is off (HF_HUB_OFFLINE)"
    failure = _probe(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S)
    return None if failure is None else f"{constants.ENDPOINT} did not answer a quick probe ({failure})"


@lru_cache(maxsize=None)
def _probe(url: str, timeout: float) -> str | None:
    """Why ``url`` gave no HTTP answer (any status below 500) within ``timeout`` seconds, name lookup included
    (the request runs in a daemon thread, abandoned at the deadline); None when it answered."""
    failure: list[str | None] = []
    thread = threading.Thread(target=lambda: failure.append(_head(url, timeout)), daemon=True)
    thread.start()
    thread.join(timeout)
    return failure[0] if failure else f"no answer within {timeout:g} s"


def _head(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}" if e.code >= 500 else None
    except (OSError, ValueError, http.client.HTTPException) as e:
        return str(getattr(e, "reason", e))


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
    provenance: Provenance | None = None  # a file's note (read_provenance)

    def describe(self, spec: BackboneSpec) -> str:
        if self.kind == "random":
            return f"{spec.family} {spec.name}: {RANDOM_FLAG} ({self.why})"
        p = self.provenance
        said = "" if p is None else f' (label: "{p.label}")' if p.label else f" (note: {p.note})"
        return f"{spec.family} {spec.name}: pretrained, {self.why}{said}"


def plan_weights(spec: BackboneSpec, weights: str = "pretrained",
                 weights_dir: str | os.PathLike | None = None) -> WeightsPlan:
    """The weights ``create_backbone(spec, weights, weights_dir)`` will load: local file, hub, or random init."""
    if weights == "random":
        return WeightsPlan("random", "random", "asked for")
    if weights not in ("pretrained", "auto"):
        return _file_plan(Path(weights), f"file {weights}")
    dirs = weights_dirs(weights_dir)
    local = find_local_weights(spec, dirs)
    if local is not None:
        return _file_plan(local, f"local file {local}")
    if in_hub_cache(spec):
        return WeightsPlan("hub", spec.hub_id, f"{spec.hub_id} from the Hugging Face cache")
    looked = (f"no {spec.arch}.*.safetensors in {', '.join(map(str, dirs))}" if dirs
              else f"no --weights-dir and ${WEIGHTS_ENV} unset")
    if weights == "pretrained":
        return WeightsPlan("hub", spec.hub_id, f"{spec.hub_id} downloaded from the hub (needs network; {looked})")
    unreachable = hub_unreachable()
    if unreachable is None:
        return WeightsPlan("hub", spec.hub_id,
                           f"{spec.hub_id} downloaded from the hub ({looked}; not in the hub cache)")
    return WeightsPlan("random", "random", f"no pretrained weights reachable: {looked}; "
                                           f"{spec.hub_id} not in the hub cache; {unreachable}")


def _file_plan(path: Path, why: str) -> WeightsPlan:
    return WeightsPlan("file", str(path), why, read_provenance(path) if path.is_file() else None)


def create_backbone(spec: BackboneSpec, weights: str = "pretrained", weights_dir: str | os.PathLike | None = None,
                    seed: int = 0) -> tuple[Backbone, WeightsInfo]:
    """Build ``spec`` with the requested weights (``plan_weights``); returns the backbone and their source."""
    torch.manual_seed(seed)
    plan = plan_weights(spec, weights, weights_dir)
    if plan.kind == "random":
        return _random_init(spec, plan, announce=weights == "auto")
    if plan.kind == "file":
        path = Path(plan.source)
        if not path.is_file():
            raise WeightsNotFound(f"{spec.name}: weights file {path} does not exist")
        info = WeightsInfo("file", str(path.resolve()), sha256_file(path), plan.provenance)
        return wrap(spec, _library_model(spec, "file", path)), info
    try:
        model = _library_model(spec, "hub", None)
    except Exception as e:  # hub unreachable or no such tag
        failed = f"download of {spec.hub_id} via {spec.library} failed ({type(e).__name__}: {str(e)[:200]})"
        if weights == "auto":
            torch.manual_seed(seed)  # the same random init as a planned one
            return _random_init(spec, WeightsPlan("random", "random", f"hub {failed}"), announce=True)
        raise WeightsNotFound(
            f"{spec.name}: no pretrained weights. Hub {failed}; {plan.why}. "
            f"Pass --weights-dir DIR or --weights FILE, or --weights random (flagged: {RANDOM_FLAG})."
        ) from e
    return wrap(spec, model), WeightsInfo("hub", spec.hub_id)


def _random_init(spec: BackboneSpec, plan: WeightsPlan, announce: bool) -> tuple[Backbone, WeightsInfo]:
    if announce:
        print(f"WARNING {plan.describe(spec)}")
    return wrap(spec, _library_model(spec, "random", None)), WeightsInfo("random", "random")
