"""Procedural synthetic retail catalog: the embedded default dataset.

Every tag is drawn into the pixels, so a vision model can learn it: category -> silhouette, colour -> fill,
pattern -> texture, material -> surface modulation, brand -> a 5x5 glyph badge, packaging -> frames and marks,
size -> a sticker with dice pips, style -> outline treatment. Pose, background, lighting and noise jitter keep
it from being trivially separable. Tag frequencies follow a Zipf-Mandelbrot law within each field, so rare
tags form a long tail; rare tags stay visually distinct from common ones.

``detail`` > 1 draws the fine marks (pattern and material textures, the brand badge, the size sticker's pips)
that many times smaller, everything else unchanged: at 400 px and ``detail`` 8 the brand glyph's cells are ~4 px,
so a tag's presence depends on detail that a 128 px copy of the image loses (``bench/cache_size_check.py``).

Same ``seed`` -> byte-identical manifest and images, whatever the number of workers: tags come from one
generator (``SeedSequence(seed, spawn_key=(0,))``), each image's pixels from its own (``image_rng(seed, index)``).
"""
from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from bakeoff.common.workers import pool_context
from bakeoff.train.data.dataset import SPLITS, STATS, Dataset, write_dataset

GENERATOR_VERSION = 1
MIN_VALUES_PER_FIELD = 2
MIN_IMAGE_SIZE = 32

Prim = Callable[[np.ndarray, np.ndarray], np.ndarray]  # local coords X, Y -> bool mask


# --- silhouettes: unions of primitives in local coordinates ([-1, 1], y down) minus holes -------------------

def _rect(cx: float, cy: float, hw: float, hh: float) -> Prim:
    return lambda X, Y: (np.abs(X - cx) <= hw) & (np.abs(Y - cy) <= hh)


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> Prim:
    return lambda X, Y: ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0


def _dome(cx: float, cy: float, rx: float, ry: float) -> Prim:
    """Upper half of an ellipse."""
    e = _ellipse(cx, cy, rx, ry)
    return lambda X, Y: e(X, Y) & (Y <= cy)


def _ring(cx: float, cy: float, r_out: float, r_in: float) -> Prim:
    def f(X, Y):
        d = (X - cx) ** 2 + (Y - cy) ** 2
        return (d <= r_out**2) & (d >= r_in**2)
    return f


def _poly(*pts: tuple[float, float]) -> Prim:
    """Convex polygon (either winding) as an intersection of half-planes."""
    p = np.asarray(pts, dtype=np.float64)
    e = np.roll(p, -1, axis=0) - p
    turns = e[:, 0] * np.roll(e, -1, axis=0)[:, 1] - e[:, 1] * np.roll(e, -1, axis=0)[:, 0]
    if not (np.all(turns >= 0) or np.all(turns <= 0)):
        raise ValueError(f"polygon {pts} is not convex")
    sign = 1.0 if turns.sum() > 0 else -1.0
    planes = [(-sign * dy, sign * dx, sign * (dy * x0 - dx * y0)) for (x0, y0), (dx, dy) in zip(p.tolist(), e.tolist())]

    def f(X, Y):
        m = np.ones(X.shape, dtype=bool)
        for a, b, c in planes:
            m &= a * X + b * Y + c >= 0
        return m
    return f


def _mirror(*pts: tuple[float, float]) -> tuple[Prim, Prim]:
    return _poly(*pts), _poly(*[(-x, y) for x, y in pts])


@dataclass(frozen=True)
class Shape:
    parts: tuple[Prim, ...]
    holes: tuple[Prim, ...] = ()
    anchor: tuple[float, float] = (0.0, 0.0)  # where the brand badge goes

    def mask(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        m = self.parts[0](X, Y)
        for p in self.parts[1:]:
            m |= p(X, Y)
        for h in self.holes:
            m &= ~h(X, Y)
        return m


# Categories in frequency-rank order (a catalog has more t-shirts than sunglasses).
SHAPES: dict[str, Shape] = {
    "t-shirt": Shape((_rect(0, 0.15, 0.5, 0.75), *_mirror((-0.5, -0.6), (-0.95, -0.25), (-0.72, 0.02), (-0.5, -0.2))),
                     (_ellipse(0, -0.62, 0.2, 0.13),), (0, 0.15)),
    "shirt": Shape((_rect(0, 0.1, 0.45, 0.8), *_mirror((-0.45, -0.7), (-0.82, 0.75), (-0.62, 0.8), (-0.45, 0.0))),
                   (_poly((-0.15, -0.71), (0.15, -0.71), (0, -0.45)),), (0, 0.15)),
    "trousers": Shape((_rect(0, -0.78, 0.55, 0.12), *_mirror((-0.55, -0.66), (0.0, -0.66), (-0.08, 0.95), (-0.5, 0.95))),
                      anchor=(-0.28, -0.3)),
    "shoe": Shape((_rect(0, 0.55, 0.92, 0.1), _poly((-0.9, 0.5), (0.9, 0.5), (0.9, 0.05), (0.35, -0.4), (-0.05, -0.4)),
                   _ellipse(-0.55, 0.3, 0.42, 0.22)), anchor=(0.3, 0.15)),
    "bag": Shape((_poly((-0.7, -0.2), (0.7, -0.2), (0.88, 0.88), (-0.88, 0.88)), _ring(0, -0.2, 0.5, 0.37)),
                 anchor=(0, 0.35)),
    "bottle": Shape((_rect(0, 0.3, 0.36, 0.65), _poly((-0.36, -0.35), (0.36, -0.35), (0.12, -0.65), (-0.12, -0.65)),
                     _rect(0, -0.74, 0.12, 0.12), _rect(0, -0.9, 0.16, 0.07)), anchor=(0, 0.3)),
    "box": Shape((_rect(-0.1, 0.15, 0.65, 0.65), _poly((-0.75, -0.5), (0.55, -0.5), (0.85, -0.8), (-0.45, -0.8)),
                  _poly((0.55, -0.5), (0.85, -0.8), (0.85, 0.5), (0.55, 0.8))), anchor=(-0.1, 0.15)),
    "dress": Shape((_rect(0, -0.48, 0.3, 0.3), _poly((-0.3, -0.2), (0.3, -0.2), (0.82, 0.95), (-0.82, 0.95)),
                    _rect(-0.2, -0.85, 0.05, 0.1), _rect(0.2, -0.85, 0.05, 0.1)), anchor=(0, 0.4)),
    "can": Shape((_rect(0, 0, 0.5, 0.75), _ellipse(0, -0.75, 0.5, 0.12), _ellipse(0, 0.75, 0.5, 0.12)), anchor=(0, 0)),
    "jar": Shape((_rect(0, 0.25, 0.62, 0.6), _ellipse(0, -0.35, 0.62, 0.22), _rect(0, -0.66, 0.48, 0.14)),
                 anchor=(0, 0.25)),
    "mug": Shape((_rect(-0.18, 0.1, 0.55, 0.65), _ring(0.4, 0.1, 0.38, 0.22)), anchor=(-0.18, 0.1)),
    "hat": Shape((_ellipse(0, 0.45, 0.95, 0.2), _rect(0, 0.05, 0.5, 0.42), _ellipse(0, -0.37, 0.5, 0.15)),
                 anchor=(0, 0.05)),
    "backpack": Shape((_rect(0, 0.2, 0.6, 0.7), _dome(0, -0.5, 0.6, 0.3), _ring(0, -0.8, 0.22, 0.12)),
                      anchor=(0, 0.3)),
    "sock": Shape((_rect(0.25, -0.3, 0.3, 0.62), _rect(-0.1, 0.45, 0.65, 0.27), _ellipse(-0.72, 0.45, 0.25, 0.27)),
                  anchor=(0.25, -0.3)),
    "skirt": Shape((_poly((-0.45, -0.65), (0.45, -0.65), (0.88, 0.8), (-0.88, 0.8)), _rect(0, -0.72, 0.47, 0.08)),
                   anchor=(0, 0.15)),
    "shorts": Shape((_rect(0, -0.62, 0.62, 0.12), *_mirror((-0.62, -0.5), (0.02, -0.5), (-0.06, 0.42), (-0.72, 0.42))),
                    anchor=(-0.32, -0.1)),
    "boot": Shape((_rect(0.25, -0.3, 0.36, 0.62), _rect(-0.05, 0.5, 0.75, 0.2), _ellipse(-0.6, 0.45, 0.3, 0.25),
                   _rect(-0.05, 0.72, 0.82, 0.06)), anchor=(0.25, -0.25)),
    "cap": Shape((_dome(0, 0.25, 0.65, 0.65), _poly((0.3, 0.12), (1.0, 0.22), (1.0, 0.34), (0.3, 0.34))),
                 anchor=(0, -0.08)),
    "tube": Shape((_poly((-0.42, -0.72), (0.42, -0.72), (0.24, 0.62), (-0.24, 0.62)), _rect(0, 0.78, 0.2, 0.16),
                   _rect(0, -0.8, 0.46, 0.07)), anchor=(0, -0.2)),
    "pouch": Shape((_poly((-0.6, -0.8), (0.6, -0.8), (0.72, 0.8), (-0.72, 0.8)), _ellipse(0, 0.8, 0.72, 0.13)),
                   (_ellipse(0, -0.62, 0.1, 0.1),), (0, 0.2)),
    "watch": Shape((_ellipse(0, 0, 0.45, 0.45), _rect(0, -0.65, 0.25, 0.35), _rect(0, 0.65, 0.25, 0.35),
                    _rect(0.5, 0, 0.08, 0.06)), anchor=(0, 0)),
    "phone": Shape((_rect(0, 0, 0.48, 0.92),), (_ellipse(0, -0.8, 0.06, 0.06),), (0, 0.05)),
    "book": Shape((_rect(0.05, 0, 0.68, 0.85),), (_rect(0.7, 0, 0.04, 0.78),), (0.0, 0)),
    "carton": Shape((_rect(0, 0.25, 0.5, 0.7), _poly((-0.5, -0.45), (0.5, -0.45), (0, -0.82)), _rect(0, -0.86, 0.3, 0.06)),
                    anchor=(0, 0.25)),
    "spray": Shape((_rect(0, 0.2, 0.36, 0.75), _dome(0, -0.55, 0.36, 0.16), _rect(0, -0.78, 0.1, 0.12),
                    _rect(-0.16, -0.85, 0.1, 0.04)), anchor=(0, 0.2)),
    "lamp": Shape((_poly((-0.3, -0.9), (0.3, -0.9), (0.62, -0.2), (-0.62, -0.2)), _rect(0, 0.3, 0.06, 0.5),
                   _ellipse(0, 0.85, 0.5, 0.12)), anchor=(0, -0.55)),
    "glove": Shape((_rect(0, 0.38, 0.45, 0.45), _rect(-0.34, -0.35, 0.09, 0.35), _rect(-0.11, -0.45, 0.09, 0.45),
                    _rect(0.12, -0.42, 0.09, 0.42), _rect(0.34, -0.3, 0.09, 0.3),
                    _poly((0.45, 0.2), (0.9, -0.2), (0.98, -0.1), (0.45, 0.55))), anchor=(0, 0.4)),
    "kettle": Shape((_ellipse(0, 0.22, 0.65, 0.6), _poly((-0.55, 0.12), (-0.95, -0.3), (-0.85, -0.36), (-0.45, -0.05)),
                     _ring(0, -0.3, 0.45, 0.34), _ellipse(0, -0.42, 0.15, 0.1)), anchor=(0, 0.25)),
    "vase": Shape((_ellipse(0, 0.3, 0.6, 0.62), _rect(0, -0.45, 0.18, 0.42), _rect(0, -0.86, 0.28, 0.06)),
                  anchor=(0, 0.3)),
    "bucket": Shape((_poly((-0.6, -0.5), (0.6, -0.5), (0.45, 0.85), (-0.45, 0.85)), _ring(0, -0.5, 0.62, 0.54)),
                    anchor=(0, 0.2)),
    "umbrella": Shape((_dome(0, 0.05, 0.95, 0.72), _rect(0, 0.45, 0.05, 0.42), _ring(-0.15, 0.85, 0.17, 0.09)),
                      anchor=(0, -0.3)),
    "ball": Shape((_ellipse(0, 0, 0.8, 0.8),), anchor=(0, 0)),
    "sunglasses": Shape((_ellipse(-0.47, 0.1, 0.4, 0.3), _ellipse(0.47, 0.1, 0.4, 0.3), _rect(0, -0.05, 0.15, 0.05),
                         _rect(-0.9, -0.08, 0.08, 0.04), _rect(0.9, -0.08, 0.08, 0.04)), anchor=(-0.47, 0.1)),
}

# Fill colours (sRGB), in frequency-rank order; spaced so they stay apart under lighting jitter.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28), "white": (246, 246, 243), "navy": (22, 36, 98), "blue": (40, 92, 215),
    "grey": (128, 128, 130), "red": (205, 32, 36), "green": (30, 140, 62), "beige": (218, 198, 160),
    "brown": (112, 66, 34), "pink": (242, 150, 184), "yellow": (246, 214, 38), "orange": (242, 126, 24),
    "purple": (112, 50, 152), "olive": (112, 118, 36), "teal": (0, 126, 130), "maroon": (112, 18, 44),
    "sky": (128, 192, 238), "lime": (164, 224, 48), "coral": (252, 112, 92), "lavender": (190, 168, 232),
    "turquoise": (60, 214, 200), "magenta": (212, 36, 172), "charcoal": (64, 66, 72), "tan": (190, 140, 88),
    "mint": (172, 238, 190), "mustard": (196, 156, 26),
}

PATTERNS = ("stripes", "checks", "dots", "floral", "camo", "pinstripes", "diagonal", "gingham", "grid",
            "zigzag", "waves", "argyle")
MATERIALS = ("cotton", "plastic", "metal", "glass", "leather", "denim", "wood", "paper", "wool", "rubber")
PACKAGING = ("box", "blister", "hang-tag", "gift-wrap", "shrink-wrap", "tray", "multipack")
SIZES = ("m", "l", "s", "xl", "xs", "xxl")  # rank order; sticker shows pips by size (xs=1 .. xxl=6)
SIZE_PIPS = {"xs": 1, "s": 2, "m": 3, "l": 4, "xl": 5, "xxl": 6}
STYLES = ("classic", "sporty", "bold", "retro", "luxury", "rustic", "neon")

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "do", "fa", "gu", "ha", "ji", "ku", "le",
              "ma", "no", "pe", "ri", "sa", "to", "ul", "ve", "wa", "xo", "yu", "ze", "bri", "cla", "dro", "fle",
              "gri", "plo", "sta", "tri", "vel", "mor", "nix", "qua")
MAX_BRANDS = 1000


def brand_names(k: int) -> tuple[str, ...]:
    """``k`` distinct two-syllable brand names, a fixed sequence (name i does not depend on k)."""
    n = len(_SYLLABLES)
    if k > n * n:
        raise ValueError(f"at most {n * n} brand names, asked for {k}")
    codes = ((np.arange(k) * 7919 + 13) % (n * n)).tolist()  # 7919 is coprime with n*n: a bijection
    return tuple(_SYLLABLES[c // n] + _SYLLABLES[c % n] for c in codes)


@dataclass(frozen=True)
class Field:
    """One tag field: its visual vocabulary (rank order) and how often and how skewed its tags are."""

    name: str
    values: tuple[str, ...]  # capacity; the first k are used when the taxonomy gives the field k tags
    presence: float  # P(an image has a tag of this field)
    share: float  # target share of n_tags
    zipf: float  # p(rank r) ∝ (r + offset) ** -zipf
    offset: float

    def probs(self, k: int) -> np.ndarray:
        p = (np.arange(k) + self.offset) ** -self.zipf
        return p / p.sum()


FIELDS: tuple[Field, ...] = (
    Field("category", tuple(SHAPES), 1.0, 0.12, 6.0, 14.0),
    Field("colour", tuple(PALETTE), 1.0, 0.096, 6.0, 12.0),
    Field("pattern", PATTERNS, 0.45, 0.048, 5.0, 5.0),
    Field("material", MATERIALS, 0.6, 0.04, 1.0, 1.0),
    Field("brand", brand_names(MAX_BRANDS), 0.7, 0.616, 1.6, 4.0),
    Field("packaging", PACKAGING, 0.35, 0.028, 1.0, 1.0),
    Field("size", SIZES, 0.4, 0.024, 0.6, 1.0),
    Field("style", STYLES, 0.3, 0.028, 1.0, 1.0),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)


def taxonomy(n_tags: int = 250) -> dict[str, tuple[str, ...]]:
    """Values per field (field order, rank order within a field); the sizes sum exactly to ``n_tags``.

    Each field gets at least MIN_VALUES_PER_FIELD values and at most its capacity; the rest goes to the
    field furthest below its target share.
    """
    low = MIN_VALUES_PER_FIELD * len(FIELDS)
    high = sum(len(f.values) for f in FIELDS)
    if not low <= n_tags <= high:
        raise ValueError(f"n_tags={n_tags}: the synthetic catalog needs {low} <= n_tags <= {high} "
                         f"({len(FIELDS)} fields x {MIN_VALUES_PER_FIELD} minimum, capacity {high})")
    k = [MIN_VALUES_PER_FIELD] * len(FIELDS)
    for _ in range(n_tags - low):
        open_ = [j for j, f in enumerate(FIELDS) if k[j] < len(f.values)]
        j = max(open_, key=lambda j: FIELDS[j].share * n_tags - k[j])
        k[j] += 1
    return {f.name: f.values[:kj] for f, kj in zip(FIELDS, k)}


def tag_names(tax: dict[str, tuple[str, ...]]) -> list[str]:
    """The flat ``field=value`` tag list (the label-matrix column order)."""
    return [f"{name}={v}" for name, values in tax.items() for v in values]


def sample_tags(n: int, rng: np.random.Generator, n_tags: int = 250, min_count: int = 0) -> np.ndarray:
    """Draw tags for ``n`` images: an ``n x len(FIELDS)`` int16 matrix of value indices, -1 = field absent.

    Within a field, values follow the field's Zipf-Mandelbrot law. ``min_count`` > 0 tops every value up to
    that many images by relabelling images of the field's most frequent value (as far as it has spare ones).
    """
    sizes = [len(v) for v in taxonomy(n_tags).values()]
    codes = np.full((n, len(FIELDS)), -1, dtype=np.int16)
    for j, (f, k) in enumerate(zip(FIELDS, sizes)):
        present = np.flatnonzero(rng.random(n) < f.presence)
        codes[present, j] = rng.choice(k, size=len(present), p=f.probs(k))
        if min_count > 0:
            _top_up(codes[:, j], k, min_count, rng)
    return codes


def _top_up(col: np.ndarray, k: int, min_count: int, rng: np.random.Generator) -> None:
    counts = np.bincount(col[col >= 0], minlength=k)
    for v in np.flatnonzero(counts < min_count):
        head = int(counts.argmax())
        m = min(min_count - counts[v], counts[head] - min_count)
        if m <= 0:
            return
        take = rng.choice(np.flatnonzero(col == head), size=m, replace=False)
        col[take] = v
        counts[v] += m
        counts[head] -= m


def decode(codes: np.ndarray, tax: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Tag lists (``field=value``) for rows of a ``sample_tags`` matrix."""
    names = [[f"{name}={v}" for v in values] for name, values in tax.items()]
    return [[names[j][c] for j, c in enumerate(row) if c >= 0] for row in codes.tolist()]


# --- rendering ---------------------------------------------------------------------------------------------

def glyphs(k: int) -> np.ndarray:
    """``k x 5 x 5`` bool brand marks: mirror-symmetric, 8..17 cells on, pairwise >= 4 cells apart."""
    return _glyph_table(k).copy()


@lru_cache(maxsize=8)
def _glyph_table(k: int) -> np.ndarray:
    rng = np.random.default_rng(20240611)  # fixed: brand i has the same mark in every dataset
    bits = (rng.permutation(1 << 15)[:, None] >> np.arange(15)) & 1
    half = bits.reshape(-1, 5, 3).astype(bool)
    cand = np.concatenate([half, half[:, :, 1::-1]], axis=2).reshape(-1, 25)
    on = cand.sum(1)
    cand = cand[(on >= 8) & (on <= 17)]
    chosen = np.zeros((k, 25), dtype=bool)
    n = 0
    for c in cand:
        if n == k:
            break
        if n == 0 or (chosen[:n] != c).sum(1).min() >= 4:
            chosen[n] = c
            n += 1
    if n < k:
        raise ValueError(f"only {n} distinct brand glyphs available, asked for {k}")
    return chosen.reshape(k, 5, 5)


@lru_cache(maxsize=16)
def _upsampler(size: int, cells: int) -> np.ndarray:
    """size x (cells + 1) bilinear interpolation matrix: A @ G @ A.T smooths a coarse grid G to size x size."""
    t = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(t.astype(int), cells - 1)
    a = np.zeros((size, cells + 1), dtype=np.float32)
    a[np.arange(size), i] = 1 - (t - i)
    a[np.arange(size), i + 1] = t - i
    return a


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    a = _upsampler(size, cells)
    return a @ rng.standard_normal((cells + 1, cells + 1), dtype=np.float32) @ a.T


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    out = m
    for _ in range(r):
        o = out.copy()
        o[1:] |= out[:-1]
        o[:-1] |= out[1:]
        o[:, 1:] |= out[:, :-1]
        o[:, :-1] |= out[:, 1:]
        out = o
    return out


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a 2-D mask by whole pixels (down/right positive), filling with False."""
    out = np.zeros_like(m)
    h, w = m.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = m[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


_DICE = {1: [(0, 0)], 2: [(-1, -1), (1, 1)], 3: [(-1, -1), (0, 0), (1, 1)],
         4: [(-1, -1), (1, -1), (-1, 1), (1, 1)], 5: [(-1, -1), (1, -1), (0, 0), (-1, 1), (1, 1)],
         6: [(-1, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (1, 1)]}  # pip positions of a die face
_LUMA = np.array([0.3, 0.59, 0.11], dtype=np.float32)
_GOLD = np.array([0.83, 0.69, 0.22], dtype=np.float32)
_INK = np.array([0.1, 0.1, 0.11], dtype=np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, colour, alpha: float = 1.0) -> None:
    """Paint ``colour`` over the ``mask`` pixels of a channel-first (3, S, S) image."""
    c = np.asarray(colour, dtype=np.float32).reshape(-1, 1)
    img[:, mask] = c if alpha == 1.0 else img[:, mask] + alpha * (c - img[:, mask])


def _contrast(c: np.ndarray) -> np.ndarray:
    """A dark or light version of colour ``c`` that stands out on it."""
    return c * 0.45 if c @ _LUMA > 0.45 else c + (1 - c) * 0.55


class Renderer:
    """Draws one image from one row of tag codes; deterministic given the generator passed in."""

    def __init__(self, n_tags: int = 250, image_size: int = 64, detail: float = 1.0):
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size={image_size}: brand marks need at least {MIN_IMAGE_SIZE} px")
        if not 1.0 <= detail <= image_size / MIN_IMAGE_SIZE:
            raise ValueError(f"detail={detail}: between 1 and image_size / {MIN_IMAGE_SIZE} = "
                             f"{image_size / MIN_IMAGE_SIZE:g} (finer marks would be under a pixel)")
        self.tax = taxonomy(n_tags)
        self.size = image_size
        self.detail = detail
        c = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
        self.V, self.U = np.meshgrid(c, c, indexing="ij")  # image coords in [-1, 1], V down
        self.shapes = [SHAPES[v] for v in self.tax["category"]]
        self.colours = np.array([PALETTE[v] for v in self.tax["colour"]], dtype=np.float32) / 255
        self.glyphs = _glyph_table(len(self.tax["brand"]))
        self.col = {name: j for j, name in enumerate(FIELD_NAMES)}
        # Sensor noise (about 3 grey levels, +0.5 for rounding): each image takes a random window of it.
        self.noise = 0.5 + 3 * np.random.default_rng(0).standard_normal((3, 2 * image_size, 2 * image_size), dtype=np.float32)

    def value(self, codes: Sequence[int], field: str) -> str | None:
        c = int(codes[self.col[field]])
        return self.tax[field][c] if c >= 0 else None

    def __call__(self, codes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """``size x size x 3`` uint8 image for one row of ``sample_tags`` codes (one value index per field)."""
        S, U, V = self.size, self.U, self.V
        # Pose, background, lighting and noise: one draw with a fixed layout, whatever the tags.
        a = rng.random(25)
        u = a.tolist()
        cx, cy = 0.2 * u[0] - 0.1, 0.2 * u[1] - 0.1
        scale = 0.6 + 0.14 * u[2]
        theta = 0.42 * u[3] - 0.21
        flip = 1.0 if u[4] < 0.5 else -1.0
        corner = 1.0 if u[5] < 0.5 else -1.0
        bg = (0.62 + 0.35 * a[6:8, None] + 0.1 * a[8:14].reshape(2, 3) - 0.05).astype(np.float32)[..., None, None]
        angle, slope = 2 * math.pi * u[14], 0.35 * u[15]
        bx, by = slope * math.cos(angle), slope * math.sin(angle)
        gain = (255 * (0.9 + 0.18 * u[16]) * (0.97 + 0.06 * a[17:20])).astype(np.float32)[:, None, None]
        fill = self.colours[codes[self.col["colour"]]] * (0.96 + 0.08 * a[20:23]).astype(np.float32)
        ny, nx = int(S * u[23]), int(S * u[24])

        cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
        du, dv = U - cx, V - cy
        X = flip * (cos * du + sin * dv)
        Y = cos * dv - sin * du
        shape = self.shapes[codes[self.col["category"]]]
        M = shape.mask(X, Y)

        # Channel-first (3, S, S) so colours broadcast over whole planes. |bx U + by V| < 0.5: no clipping.
        img = bg[0] + (bx * U + by * V + 0.5) * (bg[1] - bg[0])

        packaging, style = self.value(codes, "packaging"), self.value(codes, "style")
        self._packaging_behind(img, packaging, X, Y, M, fill)
        if style == "retro":  # drop shadow
            sh = _shift(M, max(1, S // 24), max(1, S // 24)) & ~M
            img[:, sh] *= 0.55

        obj = (fill + 0.4)[:, None, None]  # the offset lets texture and shading show on black too
        pattern = self.value(codes, "pattern")
        if pattern is not None:
            obj = obj + _pattern(pattern, X, Y, rng, S, self.detail) * (_contrast(fill) - fill)[:, None, None]
        material = self.value(codes, "material")
        lum = 1 - 0.06 * (X + Y)  # soft key light from the top left
        if material is not None:
            lum = lum * _material(material, X, Y, M, rng, S, self.detail)
        obj = obj * lum - 0.4
        np.copyto(img, obj if material != "glass" else 0.45 * img + 0.55 * obj, where=M)
        if material == "glass":
            _paint(img, M & (np.abs(X + 0.3 + 0.25 * Y) < 0.07), 1.0, 0.7)

        self._packaging_front(img, packaging, X, Y, M)
        brand = codes[self.col["brand"]]
        if brand >= 0:
            self._badge(img, self.glyphs[brand], X, Y, shape.anchor)
        if style is not None and style != "retro":
            self._style(img, style, M, X, Y, fill)
        size = self.value(codes, "size")
        if size is not None:
            self._size_sticker(img, SIZE_PIPS[size], corner)

        img *= gain
        img += self.noise[:, ny:ny + S, nx:nx + S]
        return np.clip(img, 0, 255, out=img).astype(np.uint8).transpose(1, 2, 0).copy()

    def _badge(self, img, glyph, X, Y, anchor) -> None:
        b = 0.36 / self.detail
        gx, gy = X - anchor[0], Y - anchor[1]
        _paint(img, (np.abs(gx) < b) & (np.abs(gy) < b), (0.93, 0.93, 0.9))
        ci = np.floor((gx + 0.8 * b) / (1.6 * b) * 5).astype(np.int32)
        ri = np.floor((gy + 0.8 * b) / (1.6 * b) * 5).astype(np.int32)
        inside = (ci >= 0) & (ci < 5) & (ri >= 0) & (ri < 5)
        on = inside & glyph[np.clip(ri, 0, 4), np.clip(ci, 0, 4)]
        _paint(img, on, _INK)

    def _packaging_behind(self, img, kind, X, Y, M, fill) -> None:
        S = self.size
        if kind == "box":
            w = max(2, S // 20)
            frame = np.zeros(M.shape, dtype=bool)
            frame[1:-1, 1:-1] = True
            frame[1 + w:-1 - w, 1 + w:-1 - w] = False
            _paint(img, frame, (0.72, 0.55, 0.36))
        elif kind == "blister":
            card = (np.abs(X) < 1.08) & (np.abs(Y) < 1.08)
            _paint(img, card, (0.78, 0.88, 0.95), 0.6)
            _paint(img, card & _dilate(~card, 1), (0.45, 0.55, 0.65))
        elif kind == "tray":
            _paint(img, (np.abs(X) < 1.05) & (Y > 0.82) & (Y < 1.08), (0.27, 0.27, 0.3))
        elif kind == "multipack":
            d = max(2, S // 10)
            _paint(img, _shift(M, -d, d) & ~M, fill * 0.7)

    def _packaging_front(self, img, kind, X, Y, M) -> None:
        if kind == "gift-wrap":
            band = (np.abs(X - 0.55) < 0.12) | (np.abs(Y + 0.5) < 0.12)
            _paint(img, band & M, _GOLD)
            _paint(img, M & ((np.abs(np.abs(X - 0.55) - 0.12) < 0.035) | (np.abs(np.abs(Y + 0.5) - 0.12) < 0.035)), _INK)
        elif kind == "shrink-wrap":
            wrap = (np.abs(X) < 1.1) & (np.abs(Y) < 1.1) & (((self.U - self.V) * 3.5) % 1 < 0.14)
            _paint(img, wrap, 1.0, 0.55)
        elif kind == "hang-tag":
            tx, ty = np.abs(X - 0.65), np.abs(Y + 0.8)
            tag = (tx < 0.22) & (ty < 0.14)
            _paint(img, tag, (0.93, 0.84, 0.6))
            _paint(img, ((tx - 0.12) ** 2 + ty**2 < 0.003) | (tag & ((tx > 0.18) | (ty > 0.1))), _INK)

    def _style(self, img, style, M, X, Y, fill) -> None:
        S = self.size
        r = max(1, S // 64)
        if style == "classic":
            _paint(img, _dilate(M, r) & ~M, _INK)
        elif style == "bold":
            _paint(img, _dilate(M, 3 * r) & ~M, _INK)
        elif style == "luxury":
            _paint(img, _dilate(M, 2 * r) & ~M, _GOLD)
        elif style == "neon":
            _paint(img, _dilate(M, 3 * r) & ~M, (0.2, 1.0, 0.65))
        elif style == "rustic":
            _paint(img, _dilate(M, 2 * r) & ~M & (((self.U + self.V) * 6) % 1 < 0.5), (0.4, 0.22, 0.08))
        elif style == "sporty":
            racing = M & (np.abs(np.abs(X - 0.5 * Y) - 0.16) < 0.07)  # two diagonal racing stripes
            _paint(img, racing, _INK if fill @ _LUMA > 0.5 else 1.0)

    def _size_sticker(self, img, pips: int, corner: float) -> None:
        d = self.detail
        sx, sy = self.U - 0.72 * corner, self.V + 0.72
        _paint(img, sx**2 + sy**2 < (0.27 / d) ** 2, (0.98, 0.85, 0.25))
        on = np.zeros(sx.shape, dtype=bool)
        for px, py in _DICE[pips]:
            on |= (sx - 0.12 / d * px) ** 2 + (sy - 0.12 / d * py) ** 2 < (0.055 / d) ** 2
        _paint(img, on, _INK)


def _pattern(kind: str, X: np.ndarray, Y: np.ndarray, rng: np.random.Generator, size: int,
             detail: float = 1.0) -> np.ndarray:
    """Texture coverage in [0, 1], in object coordinates (it turns with the object), ``detail`` times finer."""
    X, Y = X * detail, Y * detail
    k = 2.5  # cells per local unit
    if kind == "stripes":
        m = (Y * k) % 2 < 1
    elif kind == "checks":
        m = (np.floor(X * k) + np.floor(Y * k)) % 2 < 1
    elif kind == "dots":
        m = ((X * k) % 1 - 0.5) ** 2 + ((Y * k) % 1 - 0.5) ** 2 < 0.09
    elif kind == "floral":
        d = ((X * 2) % 1 - 0.5) ** 2 + ((Y * 2) % 1 - 0.5) ** 2
        m = (d < 0.12) & (d > 0.04)
    elif kind == "camo":
        m = _smooth_noise(rng, size, round(8 * detail)) > 0
    elif kind == "pinstripes":
        m = (X * 3.5) % 1 < 0.22
    elif kind == "diagonal":
        m = ((X + Y) * 2) % 2 < 1
    elif kind == "gingham":
        return 0.5 * (((X * k) % 2 < 1).astype(np.float32) + ((Y * k) % 2 < 1))
    elif kind == "grid":
        m = ((X * k) % 1 < 0.2) | ((Y * k) % 1 < 0.2)
    elif kind == "zigzag":
        m = ((Y + 0.35 * np.abs((X * 2.5) % 2 - 1)) * k) % 2 < 1
    elif kind == "waves":
        m = ((Y + 0.15 * np.sin(X * 8)) * k) % 2 < 1
    else:  # argyle: diamonds
        m = (np.floor((X + Y) * 1.8) + np.floor((X - Y) * 1.8)) % 2 < 1
    return m.astype(np.float32)


def _material(kind: str, X: np.ndarray, Y: np.ndarray, M: np.ndarray, rng: np.random.Generator, size: int,
              detail: float = 1.0) -> np.ndarray:
    """Multiplicative luminance modulation (mean about 1) in object coordinates, ``detail`` times finer."""
    X, Y = X * detail, Y * detail
    if kind == "cotton":
        return 1 + 0.1 * rng.standard_normal(X.shape, dtype=np.float32)
    if kind == "plastic":  # glossy rim
        return np.where(M & _dilate(~M, max(2, size // 32)), np.float32(1.45), np.float32(0.97))
    if kind == "metal":
        return 1 + 0.28 * np.cos(X * 4.0) + 0.5 * (np.abs(X + 0.3) < 0.08)
    if kind == "glass":
        return np.ones_like(X)
    if kind == "leather":
        smooth = 0.14 * _smooth_noise(rng, size, round(9 * detail))  # drawn before the grain, as always
        return 1 + smooth + 0.03 * rng.standard_normal(X.shape, dtype=np.float32)
    if kind == "denim":
        return 1 + 0.13 * np.sign(np.sin((X - Y) * 22)) + 0.04 * rng.standard_normal(X.shape, dtype=np.float32)
    if kind == "wood":
        return 1 + 0.16 * np.sin(Y * 16 + 2.5 * _smooth_noise(rng, size, round(3 * detail)))
    if kind == "paper":
        return 1 - 0.4 * (rng.random(X.shape, dtype=np.float32) < 0.07)
    if kind == "wool":
        half = rng.standard_normal(((size + 1) // 2,) * 2, dtype=np.float32)
        return 1 + 0.16 * np.repeat(np.repeat(half, 2, 0), 2, 1)[:size, :size]
    # rubber: grip bumps
    return 1 - 0.2 * (((X * 6) % 1 - 0.5) ** 2 + ((Y * 6) % 1 - 0.5) ** 2 < 0.06)


# --- the dataset -------------------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def _renderer(n_tags: int, image_size: int, detail: float = 1.0) -> Renderer:
    return Renderer(n_tags, image_size, detail)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for image ``index``'s pixels."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))


def _render_chunk(job: tuple[Path, np.ndarray, int, int, int, int, float, int]) -> None:
    out, codes, start, seed, n_tags, image_size, detail, width = job
    render = _renderer(n_tags, image_size, detail)
    for i, row in enumerate(codes, start=start):
        # Huffman-only deflate: noisy pixels have few repeats to find, so this is fastest and smallest.
        Image.fromarray(render(row, image_rng(seed, i))).save(out / f"{i:0{width}d}.png", compress_level=1,
                                                              compress_type=zlib.Z_HUFFMAN_ONLY)


def generate(out: str | Path, n_images: int = 3000, n_tags: int = 250, seed: int = 0, image_size: int = 64,
             workers: int | None = None, min_count: int = 3, detail: float = 1.0) -> Dataset:
    """Write a synthetic catalog dataset to ``out`` (images under ``out/images/``) and return it.

    A dataset already in ``out`` is replaced; its splits and stats, derived from the old manifest, are removed.

    ``workers``: processes to render with (None: all usable cores, at most one per 500 images; 1: in-process).
    ``min_count``: every tag gets at least this many images when the head of its field can spare them.
    ``detail``: how many times smaller the fine marks are drawn (see the module docstring).
    """
    if n_images < 1:
        raise ValueError(f"n_images={n_images}: need at least one image")
    tax = taxonomy(n_tags)
    _renderer(n_tags, image_size, detail)  # validate image_size and detail before any work
    codes = sample_tags(n_images, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,))), n_tags, min_count)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for stale in (SPLITS, STATS):
        (out / stale).unlink(missing_ok=True)
    width = max(6, len(str(n_images - 1)))
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), -(-n_images // 500))
    n_chunks = 1 if workers == 1 else 4 * workers
    bounds = np.linspace(0, n_images, n_chunks + 1).astype(int)
    jobs = [(out / "images", codes[a:b], int(a), seed, n_tags, image_size, detail, width)
            for a, b in zip(bounds, bounds[1:]) if b > a]
    if workers == 1:
        for job in jobs:
            _render_chunk(job)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context()) as pool:
            list(pool.map(_render_chunk, jobs))
    names = [f"{i:0{width}d}" for i in range(n_images)]
    source = {"generator": "bakeoff.train.data.synth", "version": GENERATOR_VERSION, "n_images": n_images, "n_tags": n_tags,
              "seed": seed, "image_size": image_size, "min_count": min_count, "detail": detail,
              "fields": {name: len(values) for name, values in tax.items()}}
    return write_dataset(out, [f"synth-{n}" for n in names], [f"images/{n}.png" for n in names], decode(codes, tax),
                         taxonomy=tag_names(tax), source=source)
