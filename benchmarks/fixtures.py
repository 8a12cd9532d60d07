"""What the benchmarks run on: the demo and paper presets, their prepared data, and the JPEG
files that the naive baselines decode with PIL on every access.

The paper preset needs Places-365. When ../shared/data/places365-mini exists (real 256x256
JPEGs; never copied into the repository) it stands in for the full dataset, capped to a few
images per category; otherwise the synthetic scenes are rendered at the paper's 256 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from privenc.config import Config, load_config
from privenc.data import TaskData, prepare
from privenc.data.images import resize_square
from privenc.models import Encoder

PLACES_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "places365-mini"


def frozen_encoder(config: Config) -> Encoder:
    """A randomly initialised encoder of ``config``, seeded, in eval mode, without gradients."""
    torch.manual_seed(config.train.seed)
    encoder = Encoder(config.encoder, config.data.image_size).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def demo_config(cache_dir: Path, *overrides: str) -> Config:
    return load_config("demo", [f'data.cache_dir="{cache_dir}"', *overrides])


def paper_config(cache_dir: Path, batch_size: int, *overrides: str) -> Config:
    """The paper preset (224 px input, its encoder and classifiers) at ``batch_size``, on
    places365-mini when present, else on synthetic scenes rendered at 256 px."""
    if PLACES_MINI.is_dir():
        data = [f'data.root="{PLACES_MINI}"', "data.max_per_category=24"]
    else:
        data = ["data.source=synthetic", "data.synthetic_per_category=12", "data.split=[0.5, 0.25, 0.25]",
                "train.private=g1c0", "train.desirable=g1c1"]
    return load_config("paper", [f'data.cache_dir="{cache_dir}"', *data, f"train.batch_size={batch_size}",
                                 *overrides])


def paper_data_note() -> str:
    if PLACES_MINI.is_dir():
        return f"paper preset data: {PLACES_MINI.name} (real 256x256 JPEGs), 24 images per category"
    return "paper preset data: synthetic scenes rendered at 256 px (places365-mini not present)"


def prepare_data(config: Config) -> TaskData:
    return prepare(config.data, [*config.train.private, *config.train.desirable])


def jpeg_files(data: TaskData, indices, folder: Path) -> list[Path]:
    """The JPEG file of every image in ``indices`` (source indices, e.g. a split's pool): the
    source's own files when it has any, else its cached images written once at quality 95
    into ``folder``."""
    source = data.source
    if hasattr(source, "image_path"):
        return [source.image_path(int(i)) for i in indices]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        path = folder / f"{int(i)}.jpg"
        if not path.exists():
            Image.fromarray(np.asarray(data.images[int(i)])).save(path, quality=95)
        paths.append(path)
    return paths


class JpegDataset(Dataset):
    """The naive baselines' data: decode each JPEG with PIL on every access (no cache), bring
    it to the working resolution, then the same transform as the library's dataset."""

    def __init__(self, paths: list[Path], labels: np.ndarray, load_size: int, transform) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64).reshape(len(paths), -1)
        self.load_size = load_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.paths[k]) as image:
            rgb = np.asarray(image.convert("RGB"))
        tensor = torch.from_numpy(resize_square(rgb, self.load_size).copy()).permute(2, 0, 1).contiguous()
        return self.transform(tensor), torch.from_numpy(self.labels[k].copy())
