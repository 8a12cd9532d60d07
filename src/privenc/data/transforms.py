"""From a cached image to the encoder's input.

Input contract of every model in privenc: a float32 tensor of shape (3, image_size,
image_size) with values in [-1, 1] (``(x / 255 - 0.5) / 0.5``), channels in RGB order.

The transforms start from what the cache stores: a uint8 (3, load_size, load_size) tensor,
the image already resized (shorter side) and center-cropped to load_size. Training follows
the paper's "random scaling + random crop" and evaluation its "fixed scale + center crop"
(Sec. 4.1). Randomness comes from torch's global generator, which the training loop seeds
(and DataLoader seeds per worker).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from privenc.config import DataConfig


def train_transform(cfg: DataConfig) -> v2.Transform:
    """Random rescale of the load_size image by a factor in ``cfg.scale_range``, then a random
    image_size crop (zero-padded when the rescaled image is smaller), then to [-1, 1]."""
    low, high = (round(cfg.load_size * s) for s in cfg.scale_range)
    return v2.Compose([
        # RandomResize draws the shorter side from [min_size, max_size): +1 includes ``high``.
        v2.RandomResize(max(1, low), max(1, high) + 1, antialias=True),
        v2.RandomCrop(cfg.image_size, pad_if_needed=True),
        *_to_unit_range(),
    ])


def eval_transform(cfg: DataConfig) -> v2.Transform:
    """Center image_size crop of the load_size image (fixed scale), then to [-1, 1]."""
    return v2.Compose([v2.CenterCrop(cfg.image_size), *_to_unit_range()])


def _to_unit_range() -> list[v2.Transform]:
    """uint8 [0, 255] -> float32 [-1, 1], matching the encoder's tanh output range."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
