"""From a DataConfig and task specs to tensors: open the source, split, cache, select, label.

:func:`prepare` is the one entry point training and verification use; what it decides
(splits, tasks, class counts, unreadable images) is written to the run folder by
:meth:`TaskData.write`, and a run folder that already has ``splits/`` is resumed with the
same splits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from privenc.atomic import atomic_write_text
from privenc.config import DataConfig
from privenc.data.base import Source
from privenc.data.cache import ImageStore, open_images
from privenc.data.folder import FolderSource
from privenc.data.manifest import CsvSource
from privenc.data.places365 import Places365Source
from privenc.data.splits import SPLITS, candidates, make_splits, read_splits, write_splits
from privenc.data.tasks import Task, parse_task, select
from privenc.data.transforms import eval_transform, train_transform
from privenc.errors import DataError

log = logging.getLogger(__name__)


def open_source(cfg: DataConfig) -> Source:
    """The :class:`Source` that ``cfg.source`` names; empty ``cfg.groups`` = its own groups."""
    groups = cfg.groups or None
    check_files = not cfg.skip_bad_images  # else missing files become skipped bad images
    kind = {"places365": "Places-365 root", "folder": "image folder root", "csv": "CSV manifest"}.get(cfg.source)
    if kind and cfg.root and not Path(cfg.root).exists():
        # Presets name shared data relative to the current folder: say where that resolved to.
        where = "" if Path(cfg.root).is_absolute() else f" (relative to the current folder {Path.cwd()})"
        raise DataError(f"{kind} {cfg.root} does not exist{where}; point data.root at it, e.g. "
                        f"--set data.root=/path/to/{Path(cfg.root).name}")
    if cfg.source == "synthetic":
        from privenc.data.synthetic import SyntheticSource  # written separately; imported on use

        return SyntheticSource(
            size=cfg.load_size, per_category=cfg.synthetic_per_category, seed=cfg.seed, groups=groups
        )
    if cfg.source == "places365":
        return Places365Source(cfg.root, groups, check_files=check_files)
    if cfg.source == "folder":
        return FolderSource(cfg.root, groups)
    if cfg.source == "csv":
        return CsvSource(cfg.root, cfg.category_attribute, groups, check_files=check_files)
    raise DataError(f"unknown data.source {cfg.source!r}; choose synthetic, places365, folder or csv")


class ImageDataset(torch.utils.data.Dataset):
    """Images of ``indices`` with their labels: item k -> (float32 [3, S, S] in [-1, 1],
    int64 [T] labels, one per task; -1 where a categorical task's value is unknown)."""

    def __init__(
        self,
        images: ImageStore,
        indices: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} label rows")
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(len(indices), -1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # One copy out of the read-only memmap, HWC uint8 -> CHW as torchvision expects. numpy's
        # transposing copy beats torch's permute().contiguous() on uint8 and saves a second
        # copy (docs/performance.md).
        image = torch.from_numpy(np.ascontiguousarray(self.images[int(self.indices[k])].transpose(2, 0, 1)))
        return self.transform(image), torch.from_numpy(self.labels[k].copy())


def _identity(image: torch.Tensor) -> torch.Tensor:
    return image


@dataclass
class TaskData:
    """Everything a run needs to draw batches for its tasks (built by :func:`prepare`)."""

    source: Source
    tasks: list[Task]
    indices: dict[str, np.ndarray]
    """split -> sorted image indices of the pool: the union of the tasks' balanced selections."""
    labels: dict[str, np.ndarray]
    """split -> [n, len(tasks)] int64, column t = tasks[t].labels on the pool (-1 = unknown)."""
    bad_images: list[str]
    """Ids of unreadable images left out (only with data.skip_bad_images)."""
    splits: dict[str, np.ndarray]
    """split -> every image of the split (the pool is drawn from it); recorded for resuming."""
    images: ImageStore
    config: DataConfig

    def dataset(self, split: str, augment: bool) -> ImageDataset:
        """The pool of ``split``; ``augment`` -> random rescale + crop, else center crop."""
        if split not in self.indices:
            raise KeyError(f"unknown split {split!r}; splits are {', '.join(self.indices)}")
        transform = train_transform(self.config) if augment else eval_transform(self.config)
        return ImageDataset(self.images, self.indices[split], self.labels[split], transform)

    def uint8_dataset(self, split: str) -> ImageDataset:
        """The pool of ``split`` as cached: uint8 (3, load_size, load_size) images, to be
        transformed a batch at a time by :class:`~privenc.data.transforms.BatchTransform`."""
        if split not in self.indices:
            raise KeyError(f"unknown split {split!r}; splits are {', '.join(self.indices)}")
        return ImageDataset(self.images, self.indices[split], self.labels[split], _identity)

    def summary(self) -> dict[str, Any]:
        """Task names, classes and per-split class counts (what ``tasks.json`` records)."""
        tasks = []
        for t, task in enumerate(self.tasks):
            counts = {}
            for split, labels in self.labels.items():
                column = labels[:, t]
                counts[split] = {name: int((column == k).sum()) for k, name in enumerate(task.classes)}
                if (column < 0).any():
                    counts[split]["(unknown)"] = int((column < 0).sum())
            tasks.append({**task.to_dict(), "counts": counts})
        return {
            "source": self.source.name,
            "fingerprint": self.source.fingerprint(),
            "split_sizes": {s: int(len(i)) for s, i in self.splits.items()},
            **({"group_by": self.config.group_by,
                "groups_per_split": {s: len({self.source.attributes[self.config.group_by][k] for k in i.tolist()})
                                     for s, i in self.splits.items()}} if self.config.group_by else {}),
            "pool_sizes": {s: int(len(i)) for s, i in self.indices.items()},
            "bad_images": len(self.bad_images),
            "tasks": tasks,
        }

    def write(self, run_dir: Path) -> None:
        """Record ``splits/*.txt``, ``tasks.json`` and ``bad_images.txt`` in ``run_dir``."""
        run_dir = Path(run_dir)
        write_splits(self.source, self.splits, run_dir)
        atomic_write_text(run_dir / "tasks.json", json.dumps(self.summary(), indent=2) + "\n")
        atomic_write_text(run_dir / "bad_images.txt", "".join(f"{i}\n" for i in self.bad_images))


def prepare(cfg: DataConfig, task_specs: list[str], run_dir: Path | None = None) -> TaskData:
    """Open the source, parse the tasks, build (or reuse) the image cache, split, and select.

    The pool of each split is the union over tasks of their balanced selections within it
    (one task: exactly its balanced selection); labels are every task's labels on the pool.
    If ``run_dir/splits`` exists, its splits are reused (resume, or a repeat on the same data).
    """
    source = open_source(cfg)
    tasks = [parse_task(spec, source) for spec in task_specs]  # fail on a typo before caching
    usable = candidates(source, cfg.seed, cfg.max_per_category)
    images, bad = open_images(source, usable, cfg)

    if run_dir is not None and (Path(run_dir) / "splits").is_dir():
        splits = read_splits(source, Path(run_dir))
        outside = np.setdiff1d(np.concatenate(list(splits.values())), usable)
        if len(outside):
            raise DataError(
                f"{Path(run_dir) / 'splits'} uses images such as {source.ids[int(outside[0])]!r} that this "
                f"configuration does not (data.seed or data.max_per_category changed?)"
            )
        splits = {name: np.setdiff1d(split, bad) for name, split in splits.items()}
        log.info("reusing the splits of %s", run_dir)
    else:
        splits = make_splits(source, cfg.split, cfg.seed, cfg.max_per_category, exclude=np.asarray(bad, dtype=np.int64),
                             group_by=cfg.group_by)

    indices: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for name in SPLITS:
        if tasks:
            chosen = [select(task, source, splits[name], cfg.seed) for task in tasks]
            indices[name] = np.unique(np.concatenate(chosen)).astype(np.int64)
        else:
            indices[name] = splits[name]
        if len(indices[name]) == 0:  # training and verification need all three
            raise DataError(
                f"the {name} split holds no image for the tasks {', '.join(task_specs) or '(none)'} "
                f"({len(splits[name])} images in it): too few images per category for data.split = "
                f"{cfg.split} (a category reaches every split from 3 images on)"
            )
        labels[name] = np.stack(
            [task.labels(source, indices[name]) for task in tasks], axis=1
        ) if tasks else np.zeros((len(indices[name]), 0), dtype=np.int64)
    return TaskData(
        source=source, tasks=tasks, indices=indices, labels=labels,
        bad_images=[source.ids[i] for i in bad], splits=splits, images=images, config=cfg,
    )


