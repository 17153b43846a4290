"""What the speed benchmarks run on: a random-init CNN of the registry and random uint8 images (speed only)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bakeoff.common.device import pick_device, setup_threads
from bakeoff.train.preprocess import Preprocess
from bakeoff.train.registry import Backbone, BackboneSpec, get_spec
from bakeoff.train.weights import create_backbone


@dataclass
class RandomInputs:
    spec: BackboneSpec
    backbone: Backbone
    preprocess: Preprocess
    images: np.ndarray  # N x S x S x 3 uint8
    device: torch.device

    @property
    def rows(self) -> np.ndarray:
        return np.arange(len(self.images))


def random_inputs(model: str, image_size: int, n_images: int, device: str = "auto") -> RandomInputs:
    """The CNN ``model`` (registry name or timm model) at ``image_size`` with random weights, its preprocessing
    and ``n_images`` seeded random images, on ``device`` with every core's threads (or ``$OMP_NUM_THREADS``)."""
    setup_threads()
    dev = pick_device(device)
    spec = get_spec("cnn", model, image_size)
    backbone, _ = create_backbone(spec, "random")
    images = np.random.default_rng(0).integers(0, 256, (n_images, image_size, image_size, 3), dtype=np.uint8)
    return RandomInputs(spec, backbone, Preprocess(spec.img_size, spec.mean, spec.std, dev), images, dev)
