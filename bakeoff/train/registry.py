"""One registry of backbones: family -> named variants, each with its preprocessing, pooling and the
definition of "the last 4 blocks" (the part the fine-tune strategy trains); any other timm or open_clip model
name works too (``get_spec``), with its preprocessing taken from the library's own pretrained config.

Every backbone is split into ``stem`` (frozen: image -> the activations that enter the last 4 blocks) and
``tail`` (the last 4 blocks + final norm/conv + pooling -> a feature vector). ``tail(stem(x))`` is exactly
the library model's own forward, which is what makes the frozen-trunk cache exact; ``wrap`` checks it on one
random image when it builds the split, and refuses a model whose split does not reproduce it.

"Last 4 blocks", found from the model's structure (``Backbone.describe_split`` says what they are):
- ViT (timm ``blocks`` after ``_pos_embed``; open_clip ``transformer.resblocks``): the last 4 transformer
  blocks + the final LayerNorm (+ CLIP's projection, + any pooling layers with weights).
- CNNs (timm): the modules ``forward_features`` calls, in order, with stages opened into their blocks: a
  stage is a module whose ``blocks`` Sequential holds its blocks (ConvNeXt, EfficientFormer, ...) or whose
  children are all blocks (ResNet ``layer1..4``, RegNet ``s1..s4``, EfficientNet / MobileNet ``blocks[i]``);
  a stage list (``stages``, EfficientNet's ``blocks``) holds stages. The last 4 blocks, anything after them
  (downsample layers between them, the final conv/norm) and the head's layers with weights are tuned.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from bakeoff.train.colour import ColourHistogram

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_TUNED_BLOCKS = 4
HF_HUB = "hf-hub:"
LOOKED_FOR = ("looked for a timm ViT (.blocks after _pos_embed), a timm CNN whose forward_features runs stages of "
              "blocks (ResNet layer1..4, .stages, EfficientNet/MobileNet .blocks[i]), an open_clip VisionTransformer "
              "(transformer.resblocks)")
HOW_TO_FIND = ("timm: ARCH or ARCH.TAG, listed by python -c \"import timm; print(timm.list_models('convnext*', "
               "pretrained=True))\"; open_clip: MODEL:TAG, listed by python -c \"import open_clip; "
               "print(open_clip.list_pretrained())\"; either library: hf-hub:ORG/REPO")


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: everything needed to build a backbone and feed it."""

    name: str  # registry name, e.g. "resnet50", or the timm / open_clip name it was asked for by
    family: str  # "cnn" | "dinov2" | "clip"
    library: str  # "timm" | "open_clip"
    arch: str  # timm architecture or open_clip model name (or an hf-hub:ORG/REPO id)
    pretrained_tag: str  # timm pretrained tag or open_clip pretrained tag ("" for none, and for hf-hub ids)
    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pool: str = "avg"  # "avg" | "head" (the library's own pooled pre-logits) | "cls" | "cls+mean" | "clip"
    label: str = ""
    interpolation: str = "bilinear"
    extra: dict = field(default_factory=dict)

    @property
    def hub_id(self) -> str:
        """The library's name for the weights: timm ``arch.tag``, open_clip ``arch:tag``; ``arch`` without a tag."""
        if not self.pretrained_tag:
            return self.arch
        return f"{self.arch}{'.' if self.library == 'timm' else ':'}{self.pretrained_tag}"

    def to_dict(self) -> dict:
        return asdict(self)


def _specs() -> dict[str, BackboneSpec]:
    s = [
        # cnn: ImageNet-supervised
        BackboneSpec("resnet50", "cnn", "timm", "resnet50", "a1_in1k", 224, label="ResNet-50 (timm a1_in1k)"),
        BackboneSpec("convnext_tiny", "cnn", "timm", "convnext_tiny", "fb_in1k", 224, label="ConvNeXt-T (fb_in1k)"),
        BackboneSpec("efficientnet_lite0", "cnn", "timm", "efficientnet_lite0", "ra_in1k", 224, (0.5,) * 3, (0.5,) * 3,
                     label="EfficientNet-Lite0 (ImageNet-1k)"),
        BackboneSpec("mobilenetv2_100", "cnn", "timm", "mobilenetv2_100", "ra_in1k", 224, label="MobileNetV2-1.0 (ImageNet)"),
        # dinov2: self-supervised; CLS + mean patch token is DINOv2's own linear-eval pooling
        BackboneSpec("vit_small_patch14_dinov2", "dinov2", "timm", "vit_small_patch14_dinov2", "lvd142m", 224,
                     pool="cls+mean", label="DINOv2 ViT-S/14", interpolation="bicubic"),
        BackboneSpec("vit_base_patch14_dinov2", "dinov2", "timm", "vit_base_patch14_dinov2", "lvd142m", 224,
                     pool="cls+mean", label="DINOv2 ViT-B/14", interpolation="bicubic"),
        # clip: contrastive image-text; the image embedding (after projection) is the feature. OpenAI's
        # weights use QuickGELU: the *-quickgelu configs build the same graph with or without weights.
        BackboneSpec("ViT-B-32", "clip", "open_clip", "ViT-B-32-quickgelu", "openai", 224, CLIP_MEAN, CLIP_STD, "clip",
                     label="CLIP ViT-B/32 (open_clip)", interpolation="bicubic"),
        BackboneSpec("ViT-B-16", "clip", "open_clip", "ViT-B-16-quickgelu", "openai", 224, CLIP_MEAN, CLIP_STD, "clip",
                     label="CLIP ViT-B/16 (open_clip)", interpolation="bicubic"),
        BackboneSpec("ViT-S-32", "clip", "open_clip", "ViT-S-32", "", 224, CLIP_MEAN, CLIP_STD, "clip",
                     label="CLIP ViT-S/32 (open_clip config, no public weights)", interpolation="bicubic"),
    ]
    return {x.name: x for x in s}


REGISTRY: dict[str, BackboneSpec] = _specs()
DEFAULTS: dict[str, str] = {"cnn": "resnet50", "dinov2": "vit_small_patch14_dinov2", "clip": "ViT-B-32"}
FAMILIES = tuple(DEFAULTS)


def list_models(family: str | None = None) -> list[str]:
    """Registry names (of ``family``); any timm / open_clip name works too (``get_spec``)."""
    return [n for n, s in REGISTRY.items() if family is None or s.family == family]


def get_spec(family: str, name: str | None = None, img_size: int | None = None) -> BackboneSpec:
    """The registry entry ``name`` of ``family`` (its default variant unless ``name``), or else any timm /
    open_clip model of that name (``library_spec``); optionally at another input size. A registry name wins."""
    if family not in DEFAULTS:
        raise ValueError(f"unknown backbone family {family!r}; choose from {list(DEFAULTS)}")
    name = name or DEFAULTS[family]
    if name in REGISTRY:
        spec = REGISTRY[name]
        if spec.family != family:
            raise ValueError(f"model {name!r} belongs to family {spec.family!r}, not {family!r}; "
                             f"{family} models: {list_models(family)}")
    else:
        spec = library_spec(family, name)
    return replace(spec, img_size=img_size) if img_size else spec


def library_spec(family: str, name: str) -> BackboneSpec:
    """A spec for a timm or open_clip model name, with the input size, mean, std and interpolation of the
    library's own pretrained config. Family "clip" asks open_clip first, the others timm first (the two share
    names such as ``convnext_base``); an ``hf-hub:`` id goes to the library asked first."""
    makers = (_open_clip_spec, _timm_spec) if family == "clip" else (_timm_spec, _open_clip_spec)
    for make in makers:
        spec = make(family, name)
        if spec is not None:
            return spec
    raise ValueError(f"unknown model {name!r}: not a registry name ({', '.join(REGISTRY)}), nor a timm or open_clip "
                     f"model. Names: {HOW_TO_FIND}")


def _timm_spec(family: str, name: str) -> BackboneSpec | None:
    """``name`` (``arch``, ``arch.tag`` or ``hf-hub:ORG/REPO``) through timm; None if timm does not know it."""
    import timm
    from timm.data import resolve_data_config

    if name.startswith(HF_HUB):
        try:
            cfg, _, _ = timm.models.load_model_config_from_hf(name[len(HF_HUB):])
        except Exception as e:  # offline and not cached, no such repository, not a timm repository
            raise ValueError(f"timm {name}: its config.json is not reachable on the Hugging Face hub nor in its "
                             f"cache ({type(e).__name__}: {str(e)[:200]})") from e
        arch, tag = name, ""
    else:
        arch, tag = timm.models.split_model_name_tag(name)
        if not timm.is_model(arch):
            return None
        try:
            pretrained_cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # an unknown tag
            raise ValueError(f"timm {arch} has no pretrained tag {tag!r}; its tags: "
                             f"{timm.list_pretrained(arch + '.*')}") from None
        cfg = pretrained_cfg.to_dict() if pretrained_cfg else {}
        tag = tag or cfg.get("tag") or ""
    data = resolve_data_config(pretrained_cfg=cfg)
    # DINOv2's linear-eval pooling for the dinov2 family; otherwise the model's own head pooling
    return BackboneSpec(name, family, "timm", arch, tag, int(data["input_size"][-1]), tuple(data["mean"]),
                        tuple(data["std"]), "cls+mean" if family == "dinov2" else "head", f"{name} (timm)",
                        data["interpolation"])


def _open_clip_spec(family: str, name: str) -> BackboneSpec | None:
    """``name`` (``model``, ``model:tag`` or ``hf-hub:ORG/REPO``) through open_clip; None if it does not know it."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    preprocess = asdict(PreprocessCfg())  # open_clip's defaults, which its pretrained configs override
    if name.startswith(HF_HUB):
        try:
            path = open_clip.pretrained.download_pretrained_from_hf(name[len(HF_HUB):],
                                                                    filename="open_clip_config.json")
            hub_cfg = json.loads(Path(path).read_text(encoding="utf-8"))
            model_cfg = hub_cfg["model_cfg"]
        except Exception as e:  # offline and not cached, no such repository, not an open_clip repository
            raise ValueError(f"open_clip {name}: its open_clip_config.json is not reachable on the Hugging Face hub "
                             f"nor in its cache ({type(e).__name__}: {str(e)[:200]})") from e
        arch, tag = name, ""
        preprocess = merge_preprocess_dict(preprocess, hub_cfg.get("preprocess_cfg", {}))
    else:
        arch, _, tag = name.partition(":")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            return None
        if tag and tag not in open_clip.list_pretrained_tags_by_model(arch):
            raise ValueError(f"open_clip {arch} has no pretrained tag {tag!r}; its tags: "
                             f"{open_clip.list_pretrained_tags_by_model(arch)}")
        if tag:
            preprocess = merge_preprocess_dict(preprocess, open_clip.get_pretrained_cfg(arch, tag))
    size = model_cfg["vision_cfg"].get("image_size", preprocess["size"])
    return BackboneSpec(name, family, "open_clip", arch, tag, int(size if isinstance(size, int) else size[-1]),
                        tuple(preprocess["mean"]), tuple(preprocess["std"]), "clip", f"{name} (open_clip)",
                        preprocess["interpolation"])


class Backbone(nn.Module):
    """A library model split into a frozen ``stem`` and a trainable ``tail``; ``forward = tail(stem(x))``."""

    feature_dim: int
    stem_names: list[str]  # the library model's modules in the stem, in order
    tuned_names: list[str]  # and those tuned_modules() returns

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The library model's own features, which ``tail(stem(x))`` reproduces."""
        raise NotImplementedError

    def tuned_modules(self) -> list[nn.Module]:
        """The modules the fine-tune strategy trains (the last 4 blocks + final norm/conv)."""
        raise NotImplementedError

    def describe_split(self) -> str:
        """One line, e.g. "stem: conv_stem..blocks[5][0]; tuned: blocks[5][1..3], blocks[6][0], conv_head, bn2
        (4 blocks)"."""
        stem = self.stem_names
        span = _show(stem[0]) + (f"..{_show(stem[-1])}" if len(stem) > 1 else "") if stem else "(none)"
        return f"stem: {span}; tuned: {', '.join(_runs(self.tuned_names))} ({N_TUNED_BLOCKS} blocks)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stem(x))


def _show(name: str) -> str:
    """``stages.3.blocks.0`` -> ``stages[3].blocks[0]``."""
    return re.sub(r"\.(\d+)", r"[\1]", name)


def _runs(names: list[str]) -> list[str]:
    """Consecutive siblings joined: ``blocks.5.1, blocks.5.2, blocks.6.0, bn2`` -> ``blocks[5][1..2], blocks[6][0],
    bn2``."""
    runs: list[list] = []  # [parent, first, last] for a numbered module, [name] otherwise
    for name in names:
        parent, _, last = name.rpartition(".")
        if not (parent and last.isdigit()):
            runs.append([name])
        elif runs and len(runs[-1]) == 3 and runs[-1][0] == parent and runs[-1][2] == int(last) - 1:
            runs[-1][2] = int(last)
        else:
            runs.append([parent, int(last), int(last)])
    return [_show(r[0]) if len(r) == 1 else f"{_show(r[0])}[{r[1]}{'' if r[1] == r[2] else f'..{r[2]}'}]" for r in runs]


def _with_params(model: nn.Module, names: list[str]) -> list[str]:
    """Those of ``names`` that are submodules of ``model`` with weights."""
    return [n for n in names if isinstance(getattr(model, n, None), nn.Module)
            and next(getattr(model, n).parameters(), None) is not None]


def _pool_tokens(x: torch.Tensor, pool: str, n_prefix: int) -> torch.Tensor:
    if pool == "cls":
        return x[:, 0]
    if pool == "cls+mean":
        return torch.cat([x[:, 0], x[:, n_prefix:].mean(1)], dim=-1)
    raise ValueError(f"unknown token pooling {pool!r}")


def _is_timm_vit(model: nn.Module) -> bool:
    """A timm ViT: patch embedding, position embedding (``_pos_embed``), one Sequential of blocks, final norm."""
    parts = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "norm", "forward_head")
    return all(hasattr(model, a) for a in parts) and isinstance(getattr(model, "blocks", None), nn.Sequential)


class TimmViT(Backbone):
    """timm VisionTransformer (DINOv2, ...): blocks[:-4] frozen; blocks[-4:] + norm (+ head-side norm/pool) tuned."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model, self.pool = model, pool
        self.split = len(model.blocks) - N_TUNED_BLOCKS
        after = ["norm"] + (_with_params(model, ["attn_pool", "fc_norm"]) if pool == "head" else [])
        self.stem_names = ["patch_embed", *(f"blocks.{i}" for i in range(self.split))]
        self.tuned_names = [*(f"blocks.{i}" for i in range(self.split, len(model.blocks))), *after]

    def stem(self, x):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return m.blocks[: self.split](x)

    def tail(self, h):
        m = self.model
        h = m.norm(m.blocks[self.split:](h))
        return self._pooled(h)

    def reference(self, x):
        return self._pooled(self.model.forward_features(x))

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "head":
            return self.model.forward_head(tokens, pre_logits=True)
        return _pool_tokens(tokens, self.pool, self.model.num_prefix_tokens)

    def tuned_modules(self):
        return [self.model.get_submodule(n) for n in self.tuned_names]


class OpenClipViT(Backbone):
    """open_clip VisionTransformer: resblocks[:-4] frozen; resblocks[-4:] + ln_post (+ attention pooling) + proj
    tuned."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        n = len(visual.transformer.resblocks)
        self.split = n - N_TUNED_BLOCKS
        self.stem_names = ["conv1", *(f"transformer.resblocks.{i}" for i in range(self.split))]
        self.tuned_names = [*(f"transformer.resblocks.{i}" for i in range(self.split, n)),
                            *_with_params(visual, ["ln_post", "attn_pool", "attn_pool_contrastive"]),
                            *(["proj"] if visual.proj is not None else [])]

    def stem(self, x):
        v = self.visual
        x = v._embeds(x)
        for blk in v.transformer.resblocks[: self.split]:
            x = blk(x)
        return x

    def tail(self, h):
        v = self.visual
        for blk in v.transformer.resblocks[self.split:]:
            h = blk(h)
        pooled, _ = v._pool(h)
        return pooled @ v.proj if v.proj is not None else pooled

    def reference(self, x):
        return self.visual(x)

    def tuned_modules(self):
        v = self.visual
        return [_ParamHolder(v, n) if n == "proj" else v.get_submodule(n) for n in self.tuned_names]


class _ParamHolder(nn.Module):
    """Exposes a bare parameter of ``owner`` (CLIP's ``proj``) as a module for ``tuned_modules``."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self._owner, self._name = [owner], name  # list: not registered as a submodule

    def parameters(self, recurse: bool = True):
        yield getattr(self._owner[0], self._name)


class _Link(NamedTuple):
    """One module of a CNN's forward_features chain."""

    name: str  # qualified name in the model, e.g. "stages.3.blocks.0"
    module: nn.Module
    block: bool


class TimmConvNet(Backbone):
    """timm CNN as the chain of modules its forward_features calls; the last 4 *blocks*, what follows them and
    the head's layers with weights are tuned."""

    def __init__(self, model: nn.Module, chain: list[_Link], pool: str):
        super().__init__()
        if pool not in ("avg", "head"):
            raise ValueError(f"pooling {pool!r} needs a ViT's tokens; {type(model).__name__} is a CNN")
        self.model = model
        cut = [i for i, link in enumerate(chain) if link.block][-N_TUNED_BLOCKS]
        self._stem_seq = [link.module for link in chain[:cut]]
        self._tail_seq = [link.module for link in chain[cut:]]
        in_chain = {id(p) for link in chain for p in link.module.parameters()}
        head = [n for n, m in model.named_children() if any(id(p) not in in_chain for p in m.parameters())]
        self.stem_names = [link.name for link in chain[:cut]]
        self.tuned_names = [link.name for link in chain[cut:]] + head
        model.to(memory_format=torch.channels_last)

    def stem(self, x):
        for m in self._stem_seq:
            x = m(x)
        return x

    def tail(self, h):
        if h.ndim == 4:  # a cached trunk arrives NCHW-contiguous
            h = h.contiguous(memory_format=torch.channels_last)
        for m in self._tail_seq:
            h = m(h)
        return self.model.forward_head(h, pre_logits=True)

    def reference(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def tuned_modules(self):
        return [self.model.get_submodule(n) for n in self.tuned_names]


def _call_order(model: nn.Module, run: Callable[[], object]) -> list[str]:
    """The qualified names of ``model``'s submodules in the order ``run()`` enters them."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda *_, n=n: order.append(n)) for n, m in model.named_modules() if n]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return order


def _called(order: list[str], parent: str) -> list[str] | None:
    """``parent``'s children in call order, a child whose own forward is skipped (a Sequential iterated over)
    placed where its submodules run; None unless each ran as one stretch (then they are not a chain)."""
    prefix, depth = (f"{parent}.", parent.count(".") + 1) if parent else ("", 0)
    kids: list[str] = []
    for name in order:
        if name.startswith(prefix):
            kid = ".".join(name.split(".")[: depth + 1])
            if not kids or kids[-1] != kid:
                kids.append(kid)
    return kids if len(set(kids)) == len(kids) else None


def _are_blocks(model: nn.Module, names: list[str], sequential: bool) -> bool:
    """Blocks of one stage: modules with submodules, all of one class (any classes in a Sequential)."""
    mods = [model.get_submodule(n) for n in names]
    return bool(mods) and all(next(m.children(), None) is not None for m in mods) \
        and (sequential or len({type(m) for m in mods}) == 1)


def _stage(model: nn.Module, order: list[str], name: str) -> list[_Link] | None:
    """The chain of stage ``name``: its blocks, with anything called before or after them; None if no stage."""
    kids, m = _called(order, name), model.get_submodule(name)
    if not kids:
        return None
    if isinstance(getattr(m, "blocks", None), nn.Sequential) and f"{name}.blocks" in kids:
        inner = _called(order, f"{name}.blocks")
        if not inner or not _are_blocks(model, inner, sequential=True):
            return None
        chain: list[_Link] = []
        for k in kids:
            if k == f"{name}.blocks":
                chain += [_Link(b, model.get_submodule(b), True) for b in inner]
            else:
                chain.append(_Link(k, model.get_submodule(k), False))
        return chain
    if _are_blocks(model, kids, isinstance(m, nn.Sequential)):
        return [_Link(k, model.get_submodule(k), True) for k in kids]
    return None


def _feature_chain(model: nn.Module, x: torch.Tensor) -> list[_Link]:
    """The modules ``model.forward_features`` calls, in order, stage lists and stages opened into blocks."""
    order = _call_order(model, lambda: model.forward_features(x))
    top = _called(order, "")
    if top is None:
        raise ValueError("its forward_features calls a top-level module more than once")
    chain: list[_Link] = []
    for name in top:
        subs = _called(order, name) or []
        stages = [_stage(model, order, s) for s in subs]
        if subs and all(stages):  # a stage list
            chain += [link for st in stages for link in st]
        else:
            chain += _stage(model, order, name) or [_Link(name, model.get_submodule(name), False)]
    return chain


def _split(spec: BackboneSpec, model: nn.Module, x: torch.Tensor) -> Backbone:
    """The stem/tail split of ``model`` found from its structure (not yet checked)."""
    make: Callable[[], Backbone]
    if spec.library == "open_clip":
        if not (hasattr(model, "_embeds") and hasattr(model, "_pool")
                and isinstance(getattr(getattr(model, "transformer", None), "resblocks", None), nn.ModuleList)):
            raise ValueError(f"its image tower is a {type(model).__name__}, not a VisionTransformer")
        n, make = len(model.transformer.resblocks), lambda: OpenClipViT(model)
    elif _is_timm_vit(model):
        n, make = len(model.blocks), lambda: TimmViT(model, spec.pool)
    else:
        chain = _feature_chain(model, x)
        n, make = sum(link.block for link in chain), lambda: TimmConvNet(model, chain, spec.pool)
    if n < N_TUNED_BLOCKS:
        raise ValueError(f"found {n} blocks, need {N_TUNED_BLOCKS}")
    return make()


def wrap(spec: BackboneSpec, model: nn.Module) -> Backbone:
    """Split a library model (timm model or open_clip ``.visual``) into a stem/tail ``Backbone``, found from its
    structure and checked on one random image at ``spec.img_size``: ``tail(stem(x))`` must equal its own features.
    A model whose split cannot be found or does not reproduce them is refused (ValueError naming it)."""
    x = torch.randn(1, 3, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            backbone = _split(spec, model, x)
            got, want = backbone(x), backbone.reference(x)
    except Exception as e:  # no split found, or the library model fails on this input
        raise ValueError(f"no stem/tail split for {spec.library} {spec.hub_id} ({type(model).__name__}): "
                         f"{type(e).__name__}: {str(e)[:300]}; {LOOKED_FOR}") from e
    finally:
        model.train(training)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5 + 1e-4 * float(want.abs().max())):
        raise ValueError(f"no stem/tail split for {spec.library} {spec.hub_id} ({type(model).__name__}): the split "
                         f"found from its structure ({backbone.describe_split()}) does not reproduce its own "
                         f"features (shapes {tuple(got.shape)} vs {tuple(want.shape)}); {LOOKED_FOR}")
    backbone.feature_dim = want.shape[-1]
    return backbone.train(training)


class TaggingModel(nn.Module):
    """Backbone + linear multi-label head; input: normalised NCHW float, output: logits (N x T). With ``colour``
    (:mod:`train.colour`) the head sees the pooled features followed by the image's colour histograms."""

    def __init__(self, backbone: Backbone, n_tags: int, colour: ColourHistogram | None = None):
        super().__init__()
        self.backbone = backbone
        self.colour = colour
        self.head = nn.Linear(backbone.feature_dim + (colour.dim if colour is not None else 0), n_tags)

    def side(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the head sees besides the pooled features, computed from the input images (None without)."""
        return None if self.colour is None else self.colour(x)

    def head_input(self, pooled: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        return pooled if side is None else torch.cat([pooled, side.to(pooled.dtype)], dim=-1)

    def from_trunk(self, h: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from trunk activations (the stem's output) and the side input of the same images."""
        return self.head(self.head_input(self.backbone.tail(h), side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_input(self.backbone(x), self.side(x)))
