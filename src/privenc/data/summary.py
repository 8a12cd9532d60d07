"""A readable report of what a data configuration yields (``privenc data inspect``).

It answers the questions to settle before a long run: are all categories there, how are the
splits and task classes balanced, what resolution are the images. It decodes only a sample
of images and builds no cache, so it is quick even on the full Places-365 list.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from privenc.config import DataConfig
from privenc.data.base import Source
from privenc.data.dataset import open_source
from privenc.data.splits import SPLITS, make_splits
from privenc.data.tasks import parse_task, select
from privenc.errors import DataError

SIZE_SAMPLE = 200
"""Images decoded to report image sizes."""


def inspect(cfg: DataConfig, task_specs: list[str] | tuple[str, ...] = ()) -> str:
    """Multi-line report: source, image count, per-category counts and shares per split, image
    sizes over a sample, groups, every attribute's values with their counts and unknowns, and
    the class balance of each task in ``task_specs`` in each split (no task: no task section)."""
    source = open_source(cfg)
    splits = make_splits(source, cfg.split, cfg.seed, cfg.max_per_category, group_by=cfg.group_by)
    categories = source.attributes["category"]
    # A CSV's category is one of its columns (the same list): name it, splits are drawn per its values.
    column = next((a for a in source.attributes if a != "category" and source.attributes[a] is categories), None)
    out = [
        f"source: {cfg.source} ({source.name}){f' at {cfg.root}' if cfg.root else ''}",
        f"images: {len(source)} in {len(set(categories))} categories"
        f"{f' (column {column!r}: splits are stratified by it)' if column else ''}",
        f"splits: {', '.join(f'{s} {len(splits[s])}' for s in SPLITS)} "
        f"(fractions {cfg.split}, seed {cfg.seed}"
        f"{f', at most {cfg.max_per_category} per category' if cfg.max_per_category else ''})"
        f"{_grouping(source, splits, cfg.group_by)}",
        "",
        _category_table(categories, splits),
        "",
        _sizes(source, cfg.seed),
        "",
        "groups:",
        *(f"  {g}: {', '.join(cats)}" for g, cats in source.groups.items()),
    ]
    if source.empty_categories:
        out.append(f"  (no images, dropped: {', '.join(source.empty_categories)})")
    others = [a for a in source.attributes if a != "category"]
    if others:
        out += ["", "attributes (tasks: attribute:<name>):"]
        for a in others:
            out += _attribute_lines(a + (" (the category)" if a == column else ""), source.attributes[a])
    for spec in task_specs:
        task = parse_task(spec, source)
        out += ["", f"task {task.name} ({task.kind}, {task.num_classes} classes):"]
        rows = []
        for s in SPLITS:
            chosen = select(task, source, splits[s], cfg.seed)
            labels = task.labels(source, chosen)
            rows.append([s, str(len(chosen)), *(str(int((labels == k).sum())) for k in range(task.num_classes))])
        out.append(_table(["split", "images", *task.classes], rows))
    return "\n".join(out)


def _grouping(source: Source, splits: dict[str, np.ndarray], group_by: str) -> str:
    """How many groups each split holds when splits keep a group's images together."""
    if not group_by:
        return ""
    values = source.attributes[group_by]
    counts = {s: len({values[i] for i in splits[s].tolist()}) for s in SPLITS}
    return (f"\n  disjoint by {group_by}: {sum(counts.values())} groups "
            f"({', '.join(f'{s} {n}' for s, n in counts.items())}), none in two splits")


MANY_VALUES = 10
"""An attribute with more values than this (a person's name) is summarized, not listed."""


def _attribute_lines(name: str, values: list[str]) -> list[str]:
    """Counts of an attribute's values, largest first, with each one's share of the known
    values; the majority share (what a constant guess scores) and the unknown (empty) cells."""
    counts = Counter(v for v in values if v)
    unknown = len(values) - sum(counts.values())
    known = max(1, sum(counts.values()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    head = f"  {name}: {len(counts)} values"
    if ranked:
        head += f", majority {ranked[0][0]} {100 * ranked[0][1] / known:.1f}%"
    if unknown:
        head += f", {unknown} unknown (empty: left out of its task)"
    shown = ranked if len(ranked) <= MANY_VALUES else ranked[:5]
    items = [f"{v} {n} ({100 * n / known:.1f}%)" for v, n in shown] + (["..."] if len(ranked) > MANY_VALUES else [])
    lines = [head, *_wrap(items)]
    if len(ranked) > MANY_VALUES:
        sizes = np.asarray([n for _, n in ranked])
        lines.append(f"    images per value: min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}; "
                     f"{int((sizes >= 10).sum())} values with at least 10 images")
    return lines


def _wrap(items: list[str], width: int = 100, indent: str = "    ") -> list[str]:
    """``items`` joined by commas into lines of at most ``width``, never breaking an item."""
    lines = [indent]
    for k, item in enumerate(items):
        piece = item + ("," if k < len(items) - 1 else "")
        if lines[-1] != indent and len(lines[-1]) + 1 + len(piece) > width:
            lines.append(indent)
        lines[-1] += ("" if lines[-1] == indent else " ") + piece
    return lines


def _category_table(categories: list[str], splits: dict[str, np.ndarray]) -> str:
    total = Counter(categories)
    per_split = {s: Counter(categories[i] for i in splits[s].tolist()) for s in SPLITS}
    everything = max(1, len(categories))
    rows = [[c, str(n), f"{100 * n / everything:.1f}%", *(str(per_split[s][c]) for s in SPLITS)]
            for c, n in sorted(total.items())]
    return _table(["category", "total", "share", *SPLITS], rows)


def _sizes(source: Source, seed: int) -> str:
    """min / median / max height and width over a seeded sample of decoded images."""
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(source), size=min(SIZE_SAMPLE, len(source)), replace=False)
    shapes, unreadable = [], []
    for i in sample.tolist():
        try:
            shapes.append(source.load(i).shape[:2])
        except DataError as err:
            unreadable.append(str(err))
    if not shapes:
        return f"image sizes: no readable image in a sample of {len(sample)}"
    hw = np.asarray(shapes)
    line = (
        f"image sizes (HxW over {len(shapes)} sampled): min {hw[:, 0].min()}x{hw[:, 1].min()}, "
        f"median {int(np.median(hw[:, 0]))}x{int(np.median(hw[:, 1]))}, max {hw[:, 0].max()}x{hw[:, 1].max()}"
    )
    if unreadable:
        line += f"\n  {len(unreadable)} unreadable in the sample, e.g. {unreadable[0]}"
    return line


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns: the first left-aligned (names), the others right-aligned (counts)."""
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))]
        return "  " + "  ".join(cells)

    return "\n".join([line(header), *(line(r) for r in rows)])
