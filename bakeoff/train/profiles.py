"""Named training profiles, and every reduction a bake-off trains with, listed against the full profile.

- ``full``: the registry's default model per family at its native input size, the default schedules, the whole
  train split. The default of ``python -m train`` and of the main job on your own ``--data``.
- ``cpu``: a documented reduction that fits a CPU machine (each setting has its one-line reason below).
- ``demo``: the embedded synthetic default only (64 px procedural images, 2 CPU cores, minutes).

A profile is :class:`Settings` (train options; unset = the full default) plus a reason per setting. Explicit
flags override a profile; :func:`reductions` lists every resolved setting that differs from ``full``, with the
profile's reason, or "set explicitly". The image cache is at least as large as the largest input size of the
grid (:func:`default_cache_size`), so no model sees an upsampled copy of a larger photo.

This module imports no model code (the main job in ``reports`` uses it); :func:`resolve` reads the registry and
the default schedules lazily.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# train.registry.FAMILIES, spelled out so that this module imports no torch (tests check that they agree)
FAMILIES = ("cnn", "dinov2", "clip")
PER_FAMILY = ("model", "image_size")  # Settings fields that hold one value per family
EXPLICIT = "set explicitly"


def per_family(values: list[str] | None, flag: str, families: tuple[str, ...] = FAMILIES) -> dict[str, str]:
    """``["cnn=efficientnet_lite0", "random"]`` -> {"cnn": "efficientnet_lite0", "dinov2": "random", ...}: a value
    without ``FAMILY=`` is the default of ``families``."""
    out: dict[str, str] = {}
    default = None
    for v in values or []:
        fam, sep, val = v.partition("=")
        if sep and fam in FAMILIES:
            out[fam] = val
        elif sep and fam not in FAMILIES and not val.startswith("/"):
            raise SystemExit(f"{flag} {v}: unknown family {fam!r}; families: {', '.join(FAMILIES)}")
        else:
            default = v
    return {f: out.get(f, default if f in families else None) for f in FAMILIES
            if out.get(f, default if f in families else None) is not None}


@dataclass(frozen=True)
class Settings:
    """What a profile (or a flag) sets; ``None`` / a family left out = the full profile's value."""

    model: dict[str, str] = field(default_factory=dict)  # family -> registry name (default: the registry's)
    image_size: dict[str, int] = field(default_factory=dict)  # family -> px (default: the model's native size)
    epochs: int | None = None  # fine-tune epochs (default: FinetuneConfig's)
    probe_epochs: int | None = None  # linear-probe epochs (default: ProbeConfig's)
    max_train_images: int | None = None  # stratified subset of train (default: all of it)
    cache_size: int | None = None  # image cache px (default: the largest input size of the grid)

    def merged(self, over: Settings) -> Settings:
        """``over``'s values where set, else these (per family for models and input sizes)."""
        scalars = {k: v for k, v in asdict(over).items() if k not in PER_FAMILY and v is not None}
        return replace(self, model={**self.model, **over.model}, image_size={**self.image_size, **over.image_size},
                       **scalars)

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        return cls(**{**d, "image_size": {f: int(px) for f, px in d.get("image_size", {}).items()}})

    def argv(self) -> list[str]:
        """The ``python -m train`` flags that set these settings."""
        flags = [x for name in PER_FAMILY for fam, v in getattr(self, name).items()
                 for x in (f"--{name.replace('_', '-')}", f"{fam}={v}")]
        scalars = {k: v for k, v in asdict(self).items() if k not in PER_FAMILY and v is not None}
        return flags + [x for k, v in scalars.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def settings_from_flags(model: list[str] | None, image_size: list[str] | None, epochs: int | None,
                        probe_epochs: int | None, max_train_images: int | None, cache_size: int | None,
                        families: tuple[str, ...] = FAMILIES) -> Settings:
    """Settings from ``--model/--image-size`` (``FAMILY=VALUE``, or one value for each of ``families``) and the
    scalar flags."""
    try:
        sizes = {f: int(px) for f, px in per_family(image_size, "--image-size", families).items()}
    except ValueError as e:
        raise SystemExit(f"--image-size {image_size}: {e}") from None
    return Settings(per_family(model, "--model", families), sizes, epochs, probe_epochs, max_train_images, cache_size)


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    settings: Settings
    reasons: dict[str, str] = field(default_factory=dict)  # setting ("epochs", "image_size.cnn", ...) -> why

    def reason(self, key: str, value: object) -> str:
        """Why ``key`` has ``value``: this profile's reason when it is the profile's own value."""
        mine = _value(self.settings, key)
        return self.reasons.get(key, EXPLICIT) if mine is not None and mine == value else EXPLICIT


LITE0 = "EfficientNet-Lite0 is CPU-friendly (0.4 GFLOPs at 224 px vs ResNet-50's 4.1) and has offline weights here"
PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("full", "the registry's default models at their native input sizes, default schedules, the whole "
                    "train split", Settings()),
    Profile("cpu", "a reduction that fits a CPU machine: smaller inputs, a training subset, fewer fine-tune epochs",
            Settings(model={"cnn": "efficientnet_lite0"}, image_size={"cnn": 112, "dinov2": 112, "clip": 128},
                     epochs=3, max_train_images=12_000),
            {"model.cnn": LITE0,
             "image_size.cnn": "a quarter of the pixels: about 4x less compute per image",
             "image_size.dinov2": "8 x 8 patches of 14 px (a multiple of the patch, so no edge strip goes unseen): "
                                  "65 tokens instead of 257, over 4x less compute",
             "image_size.clip": "4 x 4 patches of 32 px (112 px would leave a 16 px strip unseen): 17 tokens "
                                "instead of 50, about 3x less compute",
             "epochs": "fine-tune epochs dominate CPU training time (check the Setup's best epoch: the last one "
                       "means under-trained)",
             "max_train_images": "extraction and fine-tune time grow with training images; validation and test "
                                 "stay whole, so scores stay comparable"}),
    Profile("demo", "the embedded synthetic default only: 64 px procedural images on 2 CPU cores in minutes",
            Settings(model={"cnn": "efficientnet_lite0"}, image_size={"cnn": 64, "dinov2": 56, "clip": 64},
                     epochs=2),
            {"model.cnn": LITE0,
             "image_size.cnn": "the synthetic images are 64 px: a larger input would only upsample them",
             "image_size.dinov2": "4 x 4 patches of 14 px, the largest multiple of the patch within the 64 px images",
             "image_size.clip": "2 x 2 patches of 32 px: the synthetic images' own 64 px",
             "epochs": "the demo runs on 2 CPU cores in minutes"}),
)}


def _value(settings: Settings, key: str) -> object:
    name, _, fam = key.partition(".")
    return getattr(settings, name).get(fam) if fam else getattr(settings, name)


@dataclass(frozen=True)
class Resolved:
    """Settings made concrete for every family, with the full profile's values beside them."""

    model: dict[str, str]
    image_size: dict[str, int]
    epochs: int
    probe_epochs: int
    max_train_images: int | None
    cache_size: int
    full: dict[str, object]  # key ("model.cnn", "epochs", ...) -> the full profile's value


def default_cache_size(image_sizes: list[int]) -> int:
    """The image cache side by default: the largest input size of the runs that read the cache."""
    return max(image_sizes)


def cache_warning(img_size: int, cache_size: int) -> str | None:
    """A warning when a model's input is larger than the image cache it reads (it would see upsampled images)."""
    if img_size <= cache_size:
        return None
    return (f"input {img_size} px exceeds the {cache_size} px image cache: the model sees {cache_size} px images "
            f"upsampled; use --cache-size {img_size} or leave --cache-size unset (the largest input size)")


def resolve(settings: Settings) -> Resolved:
    """Concrete values (registry defaults, native sizes, default schedules) and the full profile's for each."""
    from bakeoff.train.finetune import FinetuneConfig
    from bakeoff.train.probe import ProbeConfig
    from bakeoff.train.registry import DEFAULTS, get_spec

    model = {f: settings.model.get(f) or DEFAULTS[f] for f in FAMILIES}
    native = {f: get_spec(f, model[f]).img_size for f in FAMILIES}
    sizes = {f: settings.image_size.get(f) or native[f] for f in FAMILIES}
    full = {**{f"model.{f}": DEFAULTS[f] for f in FAMILIES}, **{f"image_size.{f}": native[f] for f in FAMILIES},
            "epochs": FinetuneConfig.epochs, "probe_epochs": ProbeConfig.epochs, "max_train_images": None,
            "cache_size": default_cache_size(list(sizes.values()))}
    return Resolved(model, sizes, settings.epochs or FinetuneConfig.epochs,
                    settings.probe_epochs or ProbeConfig.epochs, settings.max_train_images,
                    settings.cache_size or full["cache_size"], full)


def _line(key: str, value: object, full: object, r: Resolved) -> str:
    name, _, fam = key.partition(".")
    if name == "model":
        return f"{fam} model {value} instead of {full}"
    if name == "image_size":
        return f"{fam} input {value} px instead of {full} px ({r.model[fam]}'s native size)"
    if name == "epochs":
        return f"fine-tune {value} epochs instead of {full}"
    if name == "probe_epochs":
        return f"linear probe {value} epochs instead of {full}"
    if name == "max_train_images":
        return f"training subset: at most {value:,} train images, stratified, instead of all"
    below = ": larger inputs see upsampled images" if value < full else ""
    return f"image cache {value} px instead of {full} px (the grid's largest input){below}"


def reductions(profile: Profile, resolved: Resolved) -> list[str]:
    """Every resolved setting that differs from the full profile, one line each with its reason."""
    out = []
    for key, full in resolved.full.items():
        value = _value(resolved, key)
        if value != full:
            out.append(f"{_line(key, value, full, resolved)}: {profile.reason(key, value)}")
    return out


def describe(profile: Profile, resolved: Resolved, reduced: list[str]) -> str:
    """What ``python -m train`` announces first: the profile, what it trains, and every reduction."""
    grid = ", ".join(f"{f} {resolved.model[f]} at {resolved.image_size[f]} px" for f in FAMILIES)
    subset = f"at most {resolved.max_train_images:,}" if resolved.max_train_images else "all"
    lines = [f"profile {profile.name}: {profile.summary}",
             f"  {grid}; image cache {resolved.cache_size} px; fine-tune {resolved.epochs} epochs; linear probe "
             f"{resolved.probe_epochs} epochs; {subset} train images",
             f"  reductions against the full profile: {len(reduced) or 'none'}"]
    return "\n".join(lines + [f"  - {r}" for r in reduced])

