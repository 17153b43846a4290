"""Colour histograms as a side input to the head (``--colour``): for catalogs where colour is a tag.

ImageNet, self-supervised and contrastive backbones are all trained to be partly blind to colour (colour jitter,
RandAugment), and their pooled features mix the product with its background. :class:`ColourHistogram` gives the
head what the pixels say directly: the joint RGB histogram (``bins`` per channel) of the whole image and of its
foreground (pixels farther than ``foreground_distance``, L1 over RGB in [0, 1], from the median colour of the
image's border, which is the background of a product photo and the colour the image cache pads with), each
normalised to sum 1 and square-rooted (the Hellinger map, so that a linear head compares histograms sensibly):
``2 * bins**3`` numbers per image, concatenated to the pooled features (:class:`TaggingModel`).

It is part of the model: computed from the same normalised input tensor, in fp32, from ops every runtime has
(comparison, matmul, sort), so the ONNX export and every engine compute it as training did. It has no weights; its
settings are recorded in config.json (``colour``) and the model is rebuilt from them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

GRID = 56  # pixels sampled per side (a strided grid): enough for a histogram, cheap at any input size


@dataclass(frozen=True)
class ColourConfig:
    bins: int = 6
    foreground_distance: float = 0.15

    @property
    def dim(self) -> int:
        return 2 * self.bins ** 3

    def to_dict(self) -> dict:
        return asdict(self) | {"dim": self.dim, "what": (
            f"joint RGB histograms, {self.bins} bins per channel, of the whole image and of its foreground (L1 "
            f"distance > {self.foreground_distance:g} from the border's median colour), square-rooted; "
            f"{self.dim} numbers concatenated to the pooled features")}

    @classmethod
    def from_dict(cls, d: dict) -> ColourConfig:
        return cls(bins=int(d["bins"]), foreground_distance=float(d["foreground_distance"]))


class ColourHistogram(nn.Module):
    """``(N, 3, H, W)`` normalised images -> ``(N, 2 * bins**3)`` square-rooted histograms (whole, foreground)."""

    def __init__(self, cfg: ColourConfig, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("levels", torch.arange(cfg.bins, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self._histograms(x.float())

    def _histograms(self, x: torch.Tensor) -> torch.Tensor:
        step = max(1, x.shape[-1] // GRID)
        rgb = (x[..., ::step, ::step] * self.std + self.mean).clamp(0.0, 1.0)  # N, 3, h, w
        n, b = rgb.shape[0], self.cfg.bins
        border = torch.cat([rgb[..., 0, :], rgb[..., -1, :], rgb[..., :, 0], rgb[..., :, -1]], dim=-1)  # N, 3, B
        background = border.sort(dim=-1).values[..., (border.shape[-1] - 1) // 2]  # N, 3: the lower median
        pixels = rgb.flatten(2)  # N, 3, P
        far = (pixels - background.unsqueeze(-1)).abs().sum(1) > self.cfg.foreground_distance
        foreground = torch.where(far, 1.0, 0.0)  # not a cast: FP16 converters leave a Cast's target type at fp32
        level = torch.clamp(torch.floor(pixels * b), max=b - 1)  # N, 3, P
        onehot = torch.where(level.unsqueeze(-1) == self.levels, 1.0, 0.0)  # N, 3, P, b
        red_green = (onehot[:, 0].unsqueeze(-1) * onehot[:, 1].unsqueeze(-2)).flatten(2)  # N, P, b*b
        out = []
        for weight in (torch.ones_like(foreground), foreground):  # N, P
            counts = torch.bmm(red_green.transpose(1, 2), onehot[:, 2] * weight.unsqueeze(-1)).reshape(n, b ** 3)
            out.append(torch.sqrt(counts / counts.sum(-1, keepdim=True).clamp(min=1.0)))
        return torch.cat(out, dim=-1)
