"""Augmented views of cached training images for the linear probe (``--aug-views K``).

View k (1..K) of image-cache row i: a random resized crop (area ``SCALE`` of the image, aspect ratio ``RATIO``,
as torchvision's RandomResizedCrop draws it) and a horizontal flip with probability 1/2, drawn from
``default_rng([seed, k, i])``: the same view whatever the batch, run or process. No colour jitter: colour is a
tag. The crop is resized back to the cache's size (bilinear, as the cache is resized) and stays uint8, so the
model's own preprocessing (resize to its input, normalise) is applied to a view exactly as to an original.
"""
from __future__ import annotations

import math

import numpy as np

from bakeoff.common.shards import ShardedArray
from bakeoff.train.data.cache import resize_batch

SCALE = (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)
RECIPE = {"crop": "random resized", "scale": SCALE, "ratio": RATIO, "hflip": 0.5, "colour": "unchanged"}


def view_params(seed: int, view: int, row: int, size: int) -> tuple[tuple[int, int, int, int], bool]:
    """((top, left, height, width) of the crop, flip?) of view ``view`` of row ``row`` of a ``size`` px cache;
    after 10 draws that do not fit, the whole image (torchvision's fallback for a square image)."""
    rng = np.random.default_rng([seed, view, row])
    box = (0, 0, size, size)
    for _ in range(10):
        area = size * size * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= size and 0 < h <= size:
            box = (int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w)
            break
    return box, bool(rng.random() < 0.5)


def view_of(image: np.ndarray, box: tuple[int, int, int, int], flip: bool) -> np.ndarray:
    """The crop ``box`` of a uint8 S x S x 3 image, flipped if asked, resized back to S x S uint8."""
    top, left, h, w = box
    crop = image[top:top + h, left:left + w]
    if flip:
        crop = crop[:, ::-1]
    x = resize_batch(np.ascontiguousarray(crop)[None], image.shape[0])[0]
    return x.mul(255).round_().clamp_(0, 255).byte().permute(1, 2, 0).numpy()


class ViewImages:
    """The image cache seen through view ``view``: ``ViewImages(images, seed, k)[rows]`` is a uint8 batch like
    ``images[rows]`` (what feature extraction reads), each image replaced by its view. ``images`` is the cache as
    :func:`~bakeoff.train.data.cache.load_cache` returns it (or any array of its shape), read once per batch."""

    def __init__(self, images: np.ndarray | ShardedArray, seed: int, view: int):
        self.images, self.seed, self.view = images, seed, view

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        size = self.images.shape[1]
        return np.stack([view_of(image, *view_params(self.seed, self.view, int(r), size))
                         for image, r in zip(self.images[rows], rows)])
