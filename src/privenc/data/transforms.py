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


class BatchTransform:
    """The same two transforms applied to a whole uint8 batch at once, on its device.

    ``train_transform`` / ``eval_transform`` above work image by image on the CPU; at small
    resolutions their per-image overhead costs more than the models' compute
    (docs/performance.md). Here the random rescale + crop of every image is
    one affine resampling of the batch (``affine_grid`` + bilinear ``grid_sample``), which also
    runs on a GPU. Differences from the per-image path: the scale is drawn continuously
    (not rounded to whole pixels) and the crop offset is sub-pixel; scales below 1 are not
    antialiased. Evaluation (center crop) gives exactly the per-image result.

    Randomness comes from torch's global generator (checkpointed by training).
    """

    def __init__(self, cfg: DataConfig, augment: bool) -> None:
        self.load_size, self.image_size = cfg.load_size, cfg.image_size
        self.scale_range = (float(cfg.scale_range[0]), float(cfg.scale_range[1]))
        self.augment = augment

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, L, L) -> float32 (B, 3, S, S) in [-1, 1]."""
        # Resample first, then scale to [-1, 1]: the output is smaller than the input.
        size, full = self.image_size, self.load_size
        if not self.augment:
            top = int(round((full - size) / 2.0))  # torchvision's center-crop rounding
            return images[..., top:top + size, top:top + size].float().div_(127.5).sub_(1.0)
        x = images.float()
        batch = x.shape[0]
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(batch)           # (B,)
        room = (full * scale - size).clamp(min=0)                 # crop offsets, resized pixels
        offset = torch.rand(batch, 2) * room[:, None]             # (B, 2): x, y
        _, out = resample(x, scale, offset, size, full)
        return out.div_(127.5).sub_(1.0)


def resample(x: torch.Tensor, scale: torch.Tensor | float, offset: torch.Tensor, size: int,
             full: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampling grid, (B, C, size, size) crop) of the float (B, C, full, full) batch ``x``
    resized by ``scale`` (per image (B,), or one number) and cropped at ``offset`` (B, 2: x, y,
    in resized pixels; negative = padding), bilinear, edge pixels repeated outside the image.
    Output pixel u (normalized x_n) samples the resized image at offset + u + 0.5, i.e. the
    original at (offset + u + 0.5) / scale: x_src = a * x_n + b in normalized units."""
    batch = x.shape[0]
    a = size / (full * scale)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = a
    theta[:, 0, 2] = (2 * offset[:, 0] + size) / (full * scale) - 1
    theta[:, 1, 2] = (2 * offset[:, 1] + size) / (full * scale) - 1
    grid = torch.nn.functional.affine_grid(theta.to(x.device), [batch, 3, size, size], align_corners=False)
    return grid, torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                                 align_corners=False)


class ScaledView:
    """The evaluation view at another scale: the load_size image resized by a fixed ``scale``
    (1 = the evaluation view's scale), then an image_size crop: at a random position when the
    resized image is larger, centred and padded with black (0, as ``train_transform`` pads) when
    it is smaller. uint8 (B, 3, L, L) -> float32 (B, 3, S, S) in [-1, 1], a batch at a time on
    its device; the crop positions come from torch's global generator.

    The multi-scale attacker (:mod:`privenc.attacks`) trains on such views at scales beyond the
    training augmentation's ``data.scale_range`` (which never zooms out): an attacker that has
    seen the encoding of an object at several sizes may read what one scale hides.
    """

    def __init__(self, cfg: DataConfig, scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"a view's scale must be > 0, got {scale}")
        self.load_size, self.image_size, self.scale = cfg.load_size, cfg.image_size, float(scale)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size, full, scale = self.image_size, self.load_size, self.scale
        x = images.float()
        batch = x.shape[0]
        room = full * scale - size                                # resized pixels to spare (< 0: padding)
        if room >= 0:
            offset = torch.rand(batch, 2) * room                  # (B, 2): x, y
        else:
            offset = torch.full((batch, 2), room / 2)              # centred in the padding
        grid, out = resample(x, scale, offset, size, full)
        # Border padding keeps the image's edge pixels intact; outside the image, black.
        inside = (grid.abs() <= 1).all(dim=-1)[:, None]            # (B, 1, S, S)
        return out.mul_(inside).div_(127.5).sub_(1.0)
