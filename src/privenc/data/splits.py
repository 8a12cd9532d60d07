"""Disjoint train / val / test splits, stratified by category and recorded in the run folder.

The paper splits the official Places-365 training list into its own disjoint train, val and
test sets (Sec. 4.1). Each category is shuffled by a generator seeded with (seed, category
name), so adding a category to a dataset leaves the splits of the others unchanged, and the
same seed always gives the same splits.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privenc.atomic import atomic_write_text
from privenc.data.base import Source
from privenc.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def category_order(source: Source, seed: int, max_per_category: int = 0) -> dict[str, np.ndarray]:
    """Category -> its image indices in a seeded random order, cut to ``max_per_category``."""
    by_category: dict[str, list[int]] = {}
    for index, category in enumerate(source.attributes["category"]):
        by_category.setdefault(category, []).append(index)
    order = {}
    for category in sorted(by_category):
        rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
        shuffled = rng.permutation(np.asarray(by_category[category], dtype=np.int64))
        order[category] = shuffled[:max_per_category] if max_per_category > 0 else shuffled
    return order


def candidates(source: Source, seed: int, max_per_category: int = 0) -> np.ndarray:
    """Sorted indices of every image the splits may use (all, or the per-category cap).

    The image cache covers exactly these, so it can be built before the splits are made (and
    before unreadable images are known) and is the same one when a run resumes its splits.
    """
    order = category_order(source, seed, max_per_category)
    return np.sort(np.concatenate(list(order.values()))) if order else np.zeros(0, dtype=np.int64)


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """How many of ``n`` images go to each split: nearest to ``n * fraction`` (largest
    remainder), with at least one image per split when ``n >= 3`` (taken from the largest)."""
    exact = [n * f for f in fractions]
    counts = [int(x) for x in exact]
    for k in sorted(range(len(exact)), key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts)]:
        counts[k] += 1
    if n >= 3:
        for k in range(len(counts)):
            if counts[k] == 0 and fractions[k] > 0:
                counts[counts.index(max(counts))] -= 1
                counts[k] = 1
    elif counts[0] == 0 and n > 0:  # a tiny category still contributes to training
        counts[counts.index(max(counts))] -= 1
        counts[0] = 1
    return counts


def make_splits(
    source: Source,
    fractions: list[float],
    seed: int,
    max_per_category: int = 0,
    exclude: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Stratified, disjoint, seeded train/val/test index arrays (sorted int64).

    Every category with at least 3 images gets at least one image in every split; a fraction
    of 0 would leave a split empty and is an error naming the category. ``exclude`` leaves
    images out (the unreadable ones found while caching) after the per-category cut, so the
    cut, and hence the cache, does not depend on which images turn out bad.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    excluded = np.asarray(exclude if exclude is not None else [], dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    small = []
    for category, order in category_order(source, seed, max_per_category).items():
        if len(excluded):
            order = order[~np.isin(order, excluded)]
        counts = split_counts(len(order), fractions)
        if len(order) >= 3 and 0 in counts:
            empty = SPLITS[counts.index(0)]
            raise DataError(
                f"category {category!r} ({len(order)} images): split fractions {fractions} leave "
                f"its {empty} split empty"
            )
        if len(order) < 3:
            small.append(category)
        start = 0
        for name, count in zip(SPLITS, counts):
            parts[name].append(order[start:start + count])
            start += count
    if small:
        log.warning("categories with fewer than 3 images cannot be in every split: %s", ", ".join(small))
    splits = {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}
    check_disjoint(splits, source, "make_splits")
    return splits


def check_disjoint(splits: dict[str, np.ndarray], source: Source, origin: str) -> None:
    """Raise if an image is in two splits: a leak would inflate every reported accuracy."""
    names = list(splits)
    for a, first in enumerate(names):
        for second in names[a + 1:]:
            shared = np.intersect1d(splits[first], splits[second])
            if len(shared):
                raise DataError(
                    f"{origin}: image {source.ids[int(shared[0])]!r} is in both the {first} and "
                    f"{second} splits ({len(shared)} shared)"
                )


def write_splits(source: Source, splits: dict[str, np.ndarray], out_dir: Path) -> None:
    """Write ``out_dir/splits/{train,val,test}.txt``, one image id per line (atomically)."""
    folder = Path(out_dir) / "splits"
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        ids = [source.ids[i] for i in splits[name].tolist()]
        bad = next((i for i in ids if "\n" in i or "\r" in i), None)
        if bad is not None:
            raise DataError(f"image id {bad!r} contains a line break; cannot record it in a split file")
        path = folder / f"{name}.txt"
        atomic_write_text(path, "".join(f"{i}\n" for i in ids))


def read_splits(source: Source, out_dir: Path) -> dict[str, np.ndarray]:
    """Read back the splits written by :func:`write_splits` (to resume or repeat a run).

    Ids map to indices of ``source``; an id the source does not have (other data, other
    categories) is an error naming the file and line, and so is an image in two splits.
    """
    folder = Path(out_dir) / "splits"
    position = {image_id: k for k, image_id in enumerate(source.ids)}
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.txt"
        if not path.is_file():
            raise DataError(f"split file missing: {path}")
        indices = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                image_id = line.rstrip("\r\n")
                if not image_id:
                    continue
                if image_id not in position:
                    raise DataError(f"{path}:{lineno}: image {image_id!r} is not in this {source.name} source")
                indices.append(position[image_id])
        array = np.asarray(indices, dtype=np.int64)
        if len(np.unique(array)) != len(array):
            raise DataError(f"{path}: lists an image twice")
        splits[name] = np.sort(array)
    check_disjoint(splits, source, str(folder))
    return splits
