"""(d) Data loading: images/s from the uint8 memmap cache (through the data layer's
``ImageDataset``) against decoding the JPEG files with PIL on every access.

Two levels, each like for like:
- the image itself: a uint8 (3, L, L) tensor at the working resolution (L = load_size) — what
  the cache stores, or what a decode + resize produces;
- a training batch: the same plus the training augmentation (random rescale + random crop,
  to [-1, 1]) applied per item on the CPU by ``privenc.data.transforms.train_transform`` (the
  per-image reference path), or applied once to the whole uint8 batch by
  ``privenc.data.transforms.BatchTransform`` (what training and verification do: on the
  device after the copy; on a CPU it runs on the batch in the loading process).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from privenc.data import ImageDataset, TaskData
from privenc.data.transforms import BatchTransform, train_transform

from fixtures import JpegDataset
from measure import Row, as_is, compare, interleave


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
        "naive: PIL decode per item": loader(JpegDataset(jpegs, labels, cfg.load_size, as_is)),
        "privenc: uint8 memmap cache": loader(ImageDataset(data.images, indices, labels, as_is)),
        "naive: PIL decode + per-item augmentation": loader(JpegDataset(jpegs, labels, cfg.load_size, augment)),
        "privenc: cache + per-item augmentation (per-image reference)":
            loader(ImageDataset(data.images, indices, labels, augment)),
    }
    batch_augment = BatchTransform(cfg, augment=True)

    def drain(name: str) -> int:
        for _ in loaders[name]:
            pass
        return count

    def cache_batch_augment() -> int:
        for images, _ in loaders["privenc: uint8 memmap cache"]:
            batch_augment(images)
        return count

    variants = {name: (lambda n=name: drain(n)) for name in loaders}
    variants["privenc: cache + BatchTransform on the batch (default)"] = cache_batch_augment
    rates = interleave(variants, repeats)
    size = f"{cfg.load_size} px"
    image_level = {k: rates[k] for k in ("naive: PIL decode per item", "privenc: uint8 memmap cache")}
    batch_level = {k: v for k, v in rates.items() if k not in image_level}
    return (compare(f"(d) loading uint8 images, {size}", image_level, "naive: PIL decode per item", "images/s",
                    targets={"privenc: uint8 memmap cache": target})
            + compare(f"(d) loading training batches, {size} -> {cfg.image_size} px", batch_level,
                      "naive: PIL decode + per-item augmentation", "images/s"))
