"""Disjoint train / val / test splits, stratified by category and recorded in the run folder.

The paper splits the official Places-365 training list into its own disjoint train, val and
test sets (Sec. 4.1). Each category is shuffled by a generator seeded with (seed, category
name), so adding a category to a dataset leaves the splits of the others unchanged, and the
same seed always gives the same splits.

With ``group_by`` (``data.group_by``: an attribute such as a CSV's ``person`` column) every
image sharing a value of that attribute goes to one split, so that no attacker can score by
recognizing a person it saw in training; the per-category fractions are then kept as closely
as whole groups allow.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from privenc.atomic import atomic_write_text
from privenc.data.base import Source, close_matches
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
    group_by: str = "",
) -> dict[str, np.ndarray]:
    """Stratified, disjoint, seeded train/val/test index arrays (sorted int64).

    Every category with at least 3 images gets at least one image in every split; a fraction
    of 0 would leave a split empty and is an error naming the category. ``exclude`` leaves
    images out (the unreadable ones found while caching) after the per-category cut, so the
    cut, and hence the cache, does not depend on which images turn out bad. ``group_by``
    names an attribute whose values are kept whole (:func:`group_splits`); empty = per image.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    excluded = np.asarray(exclude if exclude is not None else [], dtype=np.int64)
    if group_by:
        return group_splits(source, fractions, seed, group_by, max_per_category, excluded)
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


def group_splits(
    source: Source,
    fractions: list[float],
    seed: int,
    group_by: str,
    max_per_category: int = 0,
    excluded: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Splits in which all images with the same value of attribute ``group_by`` are together.

    Whole groups are dealt out largest first (ties in an order seeded by ``seed``): each goes
    to a split drawn with probability proportional to how many images that split still lacks
    in the group's categories (its fraction of each category, minus what it holds), or, when
    every split is full for them, to the split it overfills least. Drawing rather than filling
    train first spreads large groups over all splits as the fractions say, and taking large
    groups first leaves the small ones to even out the sizes: each split ends within about one
    small group of its fraction, per category. The per-category cut (``max_per_category``) and
    ``excluded`` apply first, as without groups.
    """
    if group_by not in source.attributes:
        raise DataError(
            f"data.group_by = {group_by!r}: the {source.name} source has no such column; its attributes are "
            f"{', '.join(a for a in source.attributes if a != 'category') or '(none but category)'}"
            f"{close_matches(group_by, source.attributes)}"
        )
    values, categories = source.attributes[group_by], source.attributes["category"]
    kept = np.sort(np.concatenate(list(category_order(source, seed, max_per_category).values())))
    if excluded is not None and len(excluded):
        kept = kept[~np.isin(kept, excluded)]
    members: dict[str, list[int]] = {}
    for i in kept.tolist():
        if not values[i]:
            raise DataError(f"data.group_by = {group_by!r}: image {source.ids[i]!r} has no {group_by} (an empty "
                            f"cell); every image needs one to be kept with its group")
        members.setdefault(values[i], []).append(i)
    names = sorted(members)
    index = {c: k for k, c in enumerate(sorted({categories[i] for i in kept.tolist()}))}
    totals = np.bincount([index[categories[i]] for i in kept.tolist()], minlength=len(index))
    target = np.outer(np.asarray(fractions, dtype=np.float64), totals)  # (split, category)
    held = np.zeros_like(target)
    rng = np.random.default_rng([seed, zlib.crc32(f"group_by:{group_by}".encode())])
    order = sorted(rng.permutation(len(names)).tolist(), key=lambda k: -len(members[names[k]]))  # stable sort
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for k in order:
        group = members[names[k]]
        count = np.bincount([index[categories[i]] for i in group], minlength=len(index)).astype(np.float64)
        lacking = np.clip(((target - held) * count).sum(axis=1) / count.sum(), 0, None)
        if lacking.sum() > 0:
            split = int(rng.choice(len(SPLITS), p=lacking / lacking.sum()))
        else:  # every split has its share of these categories: overfill the least (squared error)
            split = int(np.argmin((count * (2 * (held - target) + count)).sum(axis=1)))
        held[split] += count
        parts[SPLITS[split]].extend(group)
    empty = [name for name in SPLITS if not parts[name]]
    if empty:
        raise DataError(f"data.group_by = {group_by!r}: {len(names)} groups for {len(kept)} images leave the "
                        f"{empty[0]} split empty; split per image (data.group_by = \"\") or use more data")
    missing = [c for c, k in index.items() if totals[k] >= 3 and (held[:, k] == 0).any()]
    if missing:
        log.warning("with data.group_by = %r, some split has no image of: %s", group_by, ", ".join(missing))
    splits = {name: np.sort(np.asarray(p, dtype=np.int64)) for name, p in parts.items()}
    check_disjoint(splits, source, "group_splits")
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
