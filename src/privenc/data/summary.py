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


def inspect(cfg: DataConfig, task_specs: list[str]) -> str:
    """Multi-line report: source, image count, per-category split counts, image sizes over a
    sample, groups, and the class balance of each task in each split."""
    source = open_source(cfg)
    splits = make_splits(source, cfg.split, cfg.seed, cfg.max_per_category)
    categories = source.attributes["category"]
    out = [
        f"source: {cfg.source} ({source.name}){f' at {cfg.root}' if cfg.root else ''}",
        f"images: {len(source)} in {len(set(categories))} categories",
        f"splits: {', '.join(f'{s} {len(splits[s])}' for s in SPLITS)} "
        f"(fractions {cfg.split}, seed {cfg.seed}"
        f"{f', at most {cfg.max_per_category} per category' if cfg.max_per_category else ''})",
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
        out += ["", "attributes:"]
        for a in others:
            values = sorted({v for v in source.attributes[a] if v})
            unknown = sum(1 for v in source.attributes[a] if not v)
            out.append(f"  {a}: {len(values)} values ({', '.join(values[:8])}{', ...' if len(values) > 8 else ''})"
                       f"{f', {unknown} unknown' if unknown else ''}")
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


def _category_table(categories: list[str], splits: dict[str, np.ndarray]) -> str:
    total = Counter(categories)
    per_split = {s: Counter(categories[i] for i in splits[s].tolist()) for s in SPLITS}
    rows = [[c, str(n), *(str(per_split[s][c]) for s in SPLITS)] for c, n in sorted(total.items())]
    return _table(["category", "total", *SPLITS], rows)


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
