"""One registry of backbones: family -> named variants, each with its preprocessing, pooling and the
definition of "the last 4 blocks" (the part the fine-tune strategy trains).

Every backbone is split into ``stem`` (frozen: image -> the activations that enter the last 4 blocks) and
``tail`` (the last 4 blocks + final norm/conv + pooling -> a feature vector). ``tail(stem(x))`` is exactly
the library model's own forward, which is what makes the frozen-trunk cache exact.

"Last 4 blocks":
- ViT (timm DINOv2, open_clip CLIP): the last 4 transformer blocks + the final LayerNorm (+ CLIP's projection).
- ResNet: the last 4 bottleneck blocks (layer3's last + layer4's three).
- EfficientNet / MobileNet / ConvNeXt: the last 4 blocks of the flattened stage list (with any downsample
  layer between them), plus the final conv/norm.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
N_TUNED_BLOCKS = 4


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: everything needed to build a backbone and feed it."""

    name: str  # registry name, e.g. "resnet50"
    family: str  # "cnn" | "dinov2" | "clip"
    library: str  # "timm" | "open_clip"
    arch: str  # timm architecture or open_clip model name
    pretrained_tag: str  # timm pretrained tag or open_clip pretrained tag
    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pool: str = "avg"  # "avg" | "cls" | "cls+mean" | "clip"
    label: str = ""
    interpolation: str = "bilinear"
    extra: dict = field(default_factory=dict)

    @property
    def hub_id(self) -> str:
        return f"{self.arch}.{self.pretrained_tag}" if self.library == "timm" else f"{self.arch}:{self.pretrained_tag}"

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
    return [n for n, s in REGISTRY.items() if family is None or s.family == family]


def get_spec(family: str, name: str | None = None, img_size: int | None = None) -> BackboneSpec:
    """The registry entry for ``family`` (default variant unless ``name``), optionally at another input size."""
    if family not in DEFAULTS:
        raise ValueError(f"unknown backbone family {family!r}; choose from {list(DEFAULTS)}")
    name = name or DEFAULTS[family]
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {list(REGISTRY)}")
    spec = REGISTRY[name]
    if spec.family != family:
        raise ValueError(f"model {name!r} belongs to family {spec.family!r}, not {family!r}; "
                         f"{family} models: {list_models(family)}")
    return replace(spec, img_size=img_size) if img_size else spec


class Backbone(nn.Module):
    """A library model split into a frozen ``stem`` and a trainable ``tail``; ``forward = tail(stem(x))``."""

    feature_dim: int

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tuned_modules(self) -> list[nn.Module]:
        """The modules the fine-tune strategy trains (the last 4 blocks + final norm/conv)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stem(x))


def _pool_tokens(x: torch.Tensor, pool: str, n_prefix: int) -> torch.Tensor:
    if pool == "cls":
        return x[:, 0]
    if pool == "cls+mean":
        return torch.cat([x[:, 0], x[:, n_prefix:].mean(1)], dim=-1)
    raise ValueError(f"unknown token pooling {pool!r}")


class TimmViT(Backbone):
    """timm VisionTransformer (DINOv2): blocks[:-4] frozen, blocks[-4:] + norm tuned."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model, self.pool = model, pool
        self.split = len(model.blocks) - N_TUNED_BLOCKS
        mult = 2 if pool == "cls+mean" else 1
        self.feature_dim = model.embed_dim * mult

    def stem(self, x):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return m.blocks[: self.split](x)

    def tail(self, h):
        m = self.model
        h = m.norm(m.blocks[self.split:](h))
        return _pool_tokens(h, self.pool, m.num_prefix_tokens)

    def tuned_modules(self):
        return [*self.model.blocks[self.split:], self.model.norm]


class OpenClipViT(Backbone):
    """open_clip VisionTransformer: resblocks[:-4] frozen; resblocks[-4:] + ln_post + proj tuned."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.split = len(visual.transformer.resblocks) - N_TUNED_BLOCKS
        self.feature_dim = visual.output_dim

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

    def tuned_modules(self):
        v = self.visual
        mods = [*v.transformer.resblocks[self.split:], v.ln_post]
        return mods + ([_ParamHolder(v, "proj")] if v.proj is not None else [])


class _ParamHolder(nn.Module):
    """Exposes a bare parameter of ``owner`` (CLIP's ``proj``) as a module for ``tuned_modules``."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self._owner, self._name = [owner], name  # list: not registered as a submodule

    def parameters(self, recurse: bool = True):
        yield getattr(self._owner[0], self._name)


class TimmConvNet(Backbone):
    """timm CNN as a flat sequence of modules; the last 4 *blocks* (and what follows) are tuned."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        seq, is_block = _flatten_cnn(model)
        block_pos = [i for i, b in enumerate(is_block) if b]
        if len(block_pos) < N_TUNED_BLOCKS:
            raise ValueError(f"{type(model).__name__}: only {len(block_pos)} blocks, need {N_TUNED_BLOCKS}")
        cut = block_pos[-N_TUNED_BLOCKS]
        self._stem_seq, self._tail_seq = seq[:cut], seq[cut:]
        self.feature_dim = model.num_features
        model.to(memory_format=torch.channels_last)

    def stem(self, x):
        for m in self._stem_seq:
            x = m(x)
        return x

    def tail(self, h):
        h = h.contiguous(memory_format=torch.channels_last)  # a cached trunk arrives NCHW-contiguous
        for m in self._tail_seq:
            h = m(h)
        return self.model.forward_head(h, pre_logits=True)

    def tuned_modules(self):
        head_norm = getattr(getattr(self.model, "head", None), "norm", None)  # ConvNeXt's final norm
        return list(self._tail_seq) + ([head_norm] if isinstance(head_norm, nn.Module) else [])


def _flatten_cnn(model: nn.Module) -> tuple[list[nn.Module], list[bool]]:
    """The forward_features of timm ResNet / EfficientNet / MobileNet / ConvNeXt as (modules, is_block)."""
    name = type(model).__name__
    seq: list[nn.Module] = []
    flags: list[bool] = []

    def add(m: nn.Module, block: bool = False) -> None:
        seq.append(m)
        flags.append(block)

    if name == "ResNet":
        for m in (model.conv1, model.bn1, model.act1, model.maxpool):
            add(m)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            for blk in layer:
                add(blk, True)
    elif name == "EfficientNet":  # also MobileNetV2 and EfficientNet-Lite
        for m in (model.conv_stem, model.bn1):
            add(m)
        for stage in model.blocks:
            for blk in stage:
                add(blk, True)
        for m in (model.conv_head, model.bn2):
            add(m)
    elif name == "ConvNeXt":
        add(model.stem)
        for stage in model.stages:
            add(stage.downsample)
            for blk in stage.blocks:
                add(blk, True)
        add(model.norm_pre)
    else:
        raise ValueError(f"no stem/tail split defined for timm {name}; register it in train/registry.py")
    return seq, flags


def wrap(spec: BackboneSpec, model: nn.Module) -> Backbone:
    """Wrap a library model (timm model or open_clip ``.visual``) as a stem/tail ``Backbone``."""
    if spec.library == "open_clip":
        return OpenClipViT(model)
    if hasattr(model, "blocks") and hasattr(model, "_pos_embed"):
        return TimmViT(model, spec.pool)
    return TimmConvNet(model)


class TaggingModel(nn.Module):
    """Backbone + linear multi-label head; input: normalised NCHW float, output: logits (N x T)."""

    def __init__(self, backbone: Backbone, n_tags: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, n_tags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
