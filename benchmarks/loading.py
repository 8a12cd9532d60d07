"""(d) Data loading: images/s from the uint8 memmap cache (through the data layer's
``ImageDataset``) against decoding the JPEG files with PIL on every access.

Two levels, each like for like:
- the image itself: a uint8 (3, L, L) tensor at the working resolution (L = load_size) — what
  the cache stores, or what a decode + resize produces;
- a training batch: the same plus the training augmentation (random rescale + random crop,
  to [-1, 1]) applied per item on the CPU as ``privenc.data.transforms.train_transform`` does,
  or applied once to the whole uint8 batch (``batch_random_crop``: a prototype of augmenting
  on the device after the copy; on a CPU it runs on the batch in the loading process).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from privenc.config import DataConfig
from privenc.data import ImageDataset, TaskData
from privenc.data.transforms import train_transform

from fixtures import JpegDataset
from measure import Row, compare, interleave


def _as_is(image: torch.Tensor) -> torch.Tensor:
    return image


def batch_random_crop(images: torch.Tensor, cfg: DataConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training augmentation for a whole uint8 batch at once: every image rescaled by its
    own factor in ``cfg.scale_range`` and randomly cropped to ``cfg.image_size``, then mapped
    to [-1, 1] — one ``grid_sample`` instead of a per-item resize and crop.

    (B, 3, L, L) uint8 -> (B, 3, S, S) float32. Output pixel i of a crop at offset ``top`` of
    the image resized to R samples source coordinate (top + i + 0.5) * L / R - 0.5, which is
    what a bilinear resize to R followed by the crop samples. Equal to ``train_transform`` up
    to its rounding of the resized image to uint8, for scale factors >= 1 (upsampling, where
    antialiasing does nothing; the demo and paper presets use [1, 1.2] and [1, 1.25]).
    """
    b, _, size, _ = images.shape
    out = cfg.image_size
    low, high = (round(size * s) for s in cfg.scale_range)
    if low < out or low < size:
        raise ValueError("batch_random_crop handles scale factors >= 1 with load_size >= image_size only")
    device = images.device
    resized = torch.randint(low, high + 1, (b,), generator=generator).to(device)  # R per image
    top = (torch.rand(b, generator=generator).to(device) * (resized - out + 1)).floor()
    left = (torch.rand(b, generator=generator).to(device) * (resized - out + 1)).floor()
    steps = torch.arange(out, device=device) + 0.5
    # grid_sample's normalized coordinates (align_corners=False): -1 and 1 are the outer edges.
    ys = (top[:, None] + steps) * 2 / resized[:, None] - 1  # (B, S)
    xs = (left[:, None] + steps) * 2 / resized[:, None] - 1
    grid = torch.stack([xs[:, None, :].expand(b, out, out), ys[:, :, None].expand(b, out, out)], dim=-1)
    sampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]


def loading(data: TaskData, jpegs: list[Path], repeats: int, batch_size: int = 64,
            target: float = 5.0) -> list[Row]:
    """Images/s of every loading variant over the same images, batches of ``batch_size``."""
    cfg = data.config
    indices = data.images.indices if hasattr(data.images, "indices") else data.indices["train"]
    labels = torch.zeros(len(indices), 1, dtype=torch.long).numpy()
    count = len(indices)
    augment = train_transform(cfg)

    def loader(dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True)

    loaders = {
        "naive: PIL decode per item": loader(JpegDataset(jpegs, labels, cfg.load_size, _as_is)),
        "privenc: uint8 memmap cache": loader(ImageDataset(data.images, indices, labels, _as_is)),
        "naive: PIL decode + per-item augmentation": loader(JpegDataset(jpegs, labels, cfg.load_size, augment)),
        "privenc: cache + per-item augmentation (default)": loader(ImageDataset(data.images, indices, labels, augment)),
    }
    generator = torch.Generator().manual_seed(0)

    def drain(name: str) -> int:
        for _ in loaders[name]:
            pass
        return count

    def cache_batch_augment() -> int:
        for images, _ in loaders["privenc: uint8 memmap cache"]:
            batch_random_crop(images, cfg, generator)
        return count

    variants = {name: (lambda n=name: drain(n)) for name in loaders}
    variants["privenc: cache + batched augmentation (prototype)"] = cache_batch_augment
    rates = interleave(variants, repeats)
    size = f"{cfg.load_size} px"
    image_level = {k: rates[k] for k in ("naive: PIL decode per item", "privenc: uint8 memmap cache")}
    batch_level = {k: v for k, v in rates.items() if k not in image_level}
    return (compare(f"(d) loading uint8 images, {size}", image_level, "naive: PIL decode per item", "images/s",
                    targets={"privenc: uint8 memmap cache": target})
            + compare(f"(d) loading training batches, {size} -> {cfg.image_size} px", batch_level,
                      "naive: PIL decode + per-item augmentation", "images/s"))
