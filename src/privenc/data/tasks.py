"""Tasks: what a classifier predicts from an image, and the balanced subset it trains on.

Three kinds, named by the spec string a user writes:

- ``army_base`` (a category name): *detect* — binary, the category against the other
  categories of its group, with negatives drawn uniformly over those categories so that the
  two classes are balanced (the paper's setting, Sec. 4.1). Classes ``("other", category)``.
- ``attribute:gender``: *categorical* — every non-empty value of an attribute is a class.
- ``combined:a+b``: N desirable detection tasks learned by one (N+1)-way classifier, class 0
  "none of them" and class i "task i" (Sec. 3, several desirable attributes).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from privenc.data.base import Source, close_matches
from privenc.errors import DataError

log = logging.getLogger(__name__)

ATTRIBUTE_PREFIX = "attribute:"
COMBINED_PREFIX = "combined:"
UNKNOWN = -1
"""Label of an image whose value of a categorical attribute is empty: left out of that task's
selection, but present among a run's images when another task selects it (losses skip it)."""


@dataclass(frozen=True)
class Task:
    """One prediction target over a source's images; build it with :func:`parse_task`."""

    name: str
    """The spec as written: ``army_base``, ``attribute:gender`` or ``combined:a+b``."""
    kind: str
    """``detect`` | ``categorical`` | ``combined``."""
    classes: tuple[str, ...]
    """Class names, index = label: detect ``("other", c)``; categorical the sorted values;
    combined ``("none", t1, t2, ...)``."""
    positive: str = ""
    """detect: the category to detect."""
    negatives: tuple[str, ...] = ()
    """detect: the other categories of the positive's group(s), where negatives come from."""
    attribute: str = "category"
    """categorical: the attribute whose values are the classes."""
    parts: tuple[Task, ...] = ()
    """combined: the desirable detection tasks, in class order."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self, source: Source, indices: np.ndarray) -> np.ndarray:
        """The int64 label of each image in ``indices``; defined for every image of the source.

        detect: 1 iff the image's category is the positive one (images outside the group are
        0 too); combined: 0 = none, i = 1 + index of the first positive part; categorical:
        index in ``classes``, -1 for an empty (unknown) value.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if self.kind == "detect":
            return _is_category(source, indices, self.positive).astype(np.int64)
        if self.kind == "combined":
            out = np.zeros(len(indices), dtype=np.int64)
            for k, part in enumerate(self.parts, start=1):
                out[(out == 0) & (part.labels(source, indices) == 1)] = k  # first wins
            return out
        lookup = {value: k for k, value in enumerate(self.classes)}
        lookup[""] = UNKNOWN
        values = source.attributes[self.attribute]
        try:
            return np.fromiter((lookup[values[i]] for i in indices), dtype=np.int64, count=len(indices))
        except KeyError as err:
            raise DataError(
                f"task {self.name!r}: value {err.args[0]!r} of attribute {self.attribute!r} is not "
                f"one of its classes {list(self.classes)} (was the task parsed on another source?)"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (written to ``tasks.json`` in run folders)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "classes": list(self.classes)}
        if self.kind == "detect":
            out.update(positive=self.positive, negatives=list(self.negatives))
        elif self.kind == "categorical":
            out["attribute"] = self.attribute
        else:
            out["parts"] = [p.name for p in self.parts]
        return out


def parse_task(spec: str, source: Source) -> Task:
    """Turn a task spec into a :class:`Task`, checking it against ``source``.

    Errors name the spec: unknown category or attribute (with close matches), a category with
    no images, a category in no group or alone in its group (no negatives), an attribute with
    a single value.
    """
    spec = spec.strip()
    if not spec:
        raise DataError("empty task name")
    if spec.startswith(COMBINED_PREFIX):
        names = spec[len(COMBINED_PREFIX):].split("+")
        if len(names) < 2 or not all(n.strip() for n in names):
            raise DataError(f"task {spec!r}: expected combined:<task>+<task>[+...]")
        return combine_tasks([parse_task(n, source) for n in names])
    if spec.startswith(ATTRIBUTE_PREFIX):
        return _categorical(spec, spec[len(ATTRIBUTE_PREFIX):].strip(), source)
    return _detect(spec, source)


def _categorical(spec: str, attribute: str, source: Source) -> Task:
    if attribute not in source.attributes:
        raise DataError(
            f"task {spec!r}: unknown attribute {attribute!r}; the source has "
            f"{', '.join(source.attributes)}{close_matches(attribute, source.attributes)}"
        )
    values = sorted({v for v in source.attributes[attribute] if v})
    if len(values) < 2:
        raise DataError(
            f"task {spec!r}: attribute {attribute!r} has a single class {values}; nothing to predict"
        )
    return Task(name=spec, kind="categorical", classes=tuple(values), attribute=attribute)


def _detect(spec: str, source: Source) -> Task:
    category = spec
    present = set(source.attributes["category"])
    if category not in present:
        if category in source.empty_categories:
            raise DataError(f"task {spec!r}: category {category!r} has no images in this {source.name} source")
        raise DataError(
            f"task {spec!r}: unknown category {category!r}{close_matches(category, present)}"
        )
    groups = [g for g, categories in source.groups.items() if category in categories]
    if not groups:
        raise DataError(
            f"task {spec!r}: category {category!r} is in no group (groups: "
            f"{', '.join(source.groups) or 'none'}); add it to data.groups to draw negatives"
        )
    negatives: list[str] = []
    for group in groups:
        negatives += [c for c in source.groups[group] if c != category and c not in negatives]
    if not negatives:
        raise DataError(
            f"task {spec!r}: group {', '.join(groups)} has no category other than {category!r}, "
            f"so there are no negatives"
        )
    return Task(
        name=spec, kind="detect", classes=("other", category), positive=category,
        negatives=tuple(negatives),
    )


def attribute_tasks(source: Source, group_by: str = "") -> list[str]:
    """``attribute:<name>`` for every attribute of ``source`` an attacker could learn, in the
    source's order: the columns of a CSV source, the cues of the synthetic scenes. Left out:
    ``category`` (its values are the categories that detection tasks name one by one; give
    ``attribute:category`` to audit it as one task), ``group_by`` (data.group_by: its values
    never cross splits, so test images hold only values no attacker trained on), and attributes
    with fewer than two known values (nothing to predict)."""
    specs = []
    for name, values in source.attributes.items():
        if name == "category":
            continue
        if name == group_by:
            log.info("attribute %r is data.group_by: its values never cross splits; not audited", name)
        elif len({v for v in values if v}) < 2:
            log.info("attribute %r has fewer than two known values; not audited", name)
        else:
            specs.append(ATTRIBUTE_PREFIX + name)
    return specs


def combine_tasks(tasks: list[Task]) -> Task:
    """N desirable detection tasks -> one (N+1)-way task (Sec. 3); N == 1 returns it unchanged.

    The paper learns several desirable attributes with one classifier whose classes are
    "none of them" plus one per task; an image positive for several parts takes the first.
    """
    if not tasks:
        raise DataError("combine_tasks: no tasks to combine")
    if len(tasks) == 1:
        return tasks[0]
    names = [t.name for t in tasks]
    not_detect = [t.name for t in tasks if t.kind != "detect"]
    if not_detect:
        raise DataError(f"combined tasks must be binary detection tasks; not: {', '.join(not_detect)}")
    if len(set(names)) != len(names):
        raise DataError(f"combined task names a task twice: {'+'.join(names)}")
    return Task(
        name=COMBINED_PREFIX + "+".join(names), kind="combined", classes=("none", *names),
        parts=tuple(tasks),
    )


def select(task: Task, source: Source, indices: np.ndarray, seed: int) -> np.ndarray:
    """The task's balanced subset of ``indices`` (sorted, int64), deterministic given ``seed``.

    detect: every positive in ``indices`` plus as many negatives, spread in equal shares over
    the other categories of the group as far as each has images, drawn without replacement
    (the paper's "negatives uniformly from the other 9 categories"); if negatives run short,
    all are taken and a warning is logged. categorical: the images with a known value.
    combined: the union of its parts' selections.
    """
    indices = np.unique(np.asarray(indices, dtype=np.int64))
    if task.kind == "categorical":
        values = source.attributes[task.attribute]
        return indices[np.fromiter((bool(values[i]) for i in indices), dtype=bool, count=len(indices))]
    if task.kind == "combined":
        chosen = [select(part, source, indices, seed) for part in task.parts]
        return np.unique(np.concatenate(chosen)) if chosen else indices[:0]

    categories = np.asarray([source.attributes["category"][i] for i in indices], dtype=object)
    positives = indices[categories == task.positive]
    if len(positives) == 0:
        log.warning("task %r: no positive image among the %d given", task.name, len(indices))
    pools = [indices[categories == c] for c in task.negatives]
    # Seeded per task, so two tasks on the same split draw different negatives.
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode())])
    shares = _equal_shares(len(positives), [len(p) for p in pools], rng)
    if sum(shares) < len(positives):
        log.warning(
            "task %r: only %d negatives for %d positives; using all of them (classes unbalanced)",
            task.name, sum(shares), len(positives),
        )
    negatives = [rng.choice(pool, size=n, replace=False) for pool, n in zip(pools, shares) if n]
    return np.sort(np.concatenate([positives, *negatives])).astype(np.int64)


def _equal_shares(total: int, available: list[int], rng: np.random.Generator) -> list[int]:
    """Split ``total`` draws over categories as evenly as their ``available`` counts allow.

    Water-filling: give every category with images left an equal share, cap each at what it
    has, and hand the shortfall to the others; the remainder of an uneven division goes to
    randomly chosen categories, so no category is favoured by its position in the group.
    """
    take = [0] * len(available)
    open_ = [k for k, n in enumerate(available) if n > 0]
    remaining = total
    while remaining > 0 and open_:
        share, extra = divmod(remaining, len(open_))
        bonus = set(rng.choice(open_, size=extra, replace=False).tolist()) if extra else set()
        for k in open_:
            take[k] += min(share + (k in bonus), available[k] - take[k])
        remaining = total - sum(take)
        open_ = [k for k in open_ if take[k] < available[k]]
    return take


def _is_category(source: Source, indices: np.ndarray, category: str) -> np.ndarray:
    values = source.attributes["category"]
    return np.fromiter((values[i] == category for i in indices), dtype=bool, count=len(indices))
