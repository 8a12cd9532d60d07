"""The embedded default data: procedural "synthetic scenes", generated in code (no download).

Why scenes and not noise: the paper's problem is hard because a Places-365 category is
signalled by many redundant cues at once (objects, colours, textures, layout), so an encoder
that hides one category must remove all of them, and removing a cue costs the other categories
that also rely on that kind of feature (Sec. 1 and 4.2). This generator reproduces that
structure at any resolution, deterministically, in seconds:

* Categories come in groups (built-in: ``g1`` and ``g2``, eight categories each, like the paper's
  two groups of ten). Every category has one value of each of four **cue types**:

  - ``shape``   — two or three dark objects of one of 8 shapes (fine detail: a 17-px box blur
    erases it);
  - ``texture`` — a background grating at one of 8 orientations (fine detail, erased by blur);
  - ``palette`` — the background hue, one of 8 hues, heavily jittered (coarse; survives blur);
  - ``layout``  — the direction in which the scene brightens, one of 8 (coarse; survives blur).

* Within a group the category -> value map is one-to-one for every cue type, so any single cue
  identifies the category; the cue *types* (and vocabularies) are shared by all categories and
  both groups, with a different assignment per group, so destroying a kind of feature to hide one
  category costs every other category that uses it.
* Each cue is present independently with probability :data:`CUE_PROBABILITY` (at least one
  always is); everything is noisy (position, size, rotation, colour, amplitude jitter; a
  low-frequency colour field; pixel noise; neutral distractor objects outside the vocabulary).

Image ``n`` of category ``c`` depends only on ``(seed, c, n, size)``: it is rendered from a numpy
Generator seeded by those numbers, so ``load(i)`` equals ``generate_all()[i]``, restricting the
groups does not change the pictures, and bumping :data:`GENERATOR_VERSION` invalidates caches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from privenc.data.base import Source, close_matches
from privenc.data.scenes import (  # noqa: F401  (the vocabularies are part of this module's interface)
    _DRAWS,
    _PRESENCE_DRAWS,
    _SDF,
    CUE_PROBABILITY,
    CUE_TYPES,
    DISTRACTOR_SHAPES,
    LAYOUTS,
    PALETTES,
    SHAPES,
    TEXTURES,
    VOCABULARY,
    _presence,
    _render,
    _scene,
)
from privenc.errors import DataError

GENERATOR_VERSION = 3
"""Bump whenever the pictures change for a given (seed, category, index, size); part of the
fingerprint, so stale caches are rebuilt."""

# Category k of a group -> value index of each cue type (shape, texture, palette, layout).
# Every column is a permutation of 0..7, so any single cue identifies the category within its
# group; the two groups share the vocabularies with different pairings. The pairings were chosen
# by a random search so that no two categories of a group are neighbours (one step apart on the
# circle of orientations, hues or directions) in more than one cue type, and none pairs similar
# shapes (disk/square/ring, plus/cross) with neighbouring textures:
# confusable pairs would make detection depend on a single cue.
ASSIGNMENT: dict[str, list[tuple[int, int, int, int]]] = {
    "g1": [(0, 0, 7, 6), (1, 2, 4, 1), (2, 1, 1, 4), (3, 6, 0, 0),
           (4, 5, 5, 5), (5, 4, 3, 7), (6, 3, 6, 3), (7, 7, 2, 2)],
    "g2": [(5, 4, 6, 6), (0, 6, 0, 7), (3, 1, 5, 0), (6, 7, 2, 5),
           (1, 0, 7, 3), (4, 3, 4, 4), (7, 5, 3, 1), (2, 2, 1, 2)],
}
BUILTIN_GROUPS: dict[str, list[str]] = {g: [f"{g}c{k}" for k in range(len(rows))] for g, rows in ASSIGNMENT.items()}

class SyntheticSource(Source):
    """Synthetic scenes: ``per_category`` images of every category of ``groups``, generated in code.

    ``groups`` restricts or regroups the built-in categories (``g1c0 .. g1c7``, ``g2c0 .. g2c7``);
    a category keeps its own cues wherever it is placed. Besides ``category``, the attributes hold
    ``group`` and the value of every cue type in each image (``"none"`` when absent), usable as
    categorical tasks (``attribute:palette``).
    """

    name = "synthetic"

    def __init__(
        self,
        size: int = 36,
        per_category: int = 400,
        seed: int = 0,
        groups: dict[str, list[str]] | None = None,
    ) -> None:
        if size < 4:
            raise DataError(f"synthetic image size must be >= 4, got {size}")
        if per_category < 1:
            raise DataError(f"synthetic per_category must be >= 1, got {per_category}")
        self.size = size
        self.per_category = per_category
        self.seed = seed
        self.groups = {g: list(cats) for g, cats in (groups or BUILTIN_GROUPS).items()}
        for group, cats in self.groups.items():
            if not cats:
                raise DataError(f"synthetic group {group!r} is empty")
            for c in cats:
                if c not in _CATEGORY_KEY:
                    raise DataError(f"synthetic group {group!r}: unknown category {c!r}"
                                    f"{close_matches(c, _CATEGORY_KEY)}; "
                                    f"the synthetic categories are {', '.join(_CATEGORY_KEY)}")
        self.categories = list(dict.fromkeys(c for cats in self.groups.values() for c in cats))
        self._rows = [(c, n) for c in self.categories for n in range(per_category)]
        self.ids = [f"synthetic/{c}/{n:06d}" for c, n in self._rows]

        # attributes: category, group, and the value of each cue type ("none" where absent)
        self.attributes = {"category": [c for c, _ in self._rows],
                           "group": [_CATEGORY_KEY[c][0] for c, _ in self._rows]}
        head = np.stack([self._rng(c, n).random(_PRESENCE_DRAWS) for c, n in self._rows])
        present = _presence(head)  # (N, cue type)
        for t, cue in enumerate(CUE_TYPES):
            self.attributes[cue] = [VOCABULARY[cue][cue_values(c)[t]] if p else "none"
                                    for (c, _), p in zip(self._rows, present[:, t])]

    def fingerprint(self) -> str:
        groups = ";".join(f"{g}={','.join(cats)}" for g, cats in self.groups.items())
        return (f"SyntheticSource:v{GENERATOR_VERSION}:size={self.size}:per_category={self.per_category}"
                f":seed={self.seed}:{groups}")

    def load(self, index: int) -> np.ndarray:
        return self.generate([index])[0]

    def load_many(self, indices: list[int]) -> list[np.ndarray]:
        return list(self.generate(indices))

    def generate_all(self, cues: Sequence[str] | None = None) -> np.ndarray:
        """All images, ``[N, size, size, 3]`` uint8, in ``ids`` order (vectorized: seconds for thousands)."""
        return self.generate(range(len(self.ids)), cues=cues)

    def generate(self, indices: Sequence[int], cues: Sequence[str] | None = None, chunk: int = 1024) -> np.ndarray:
        """Images ``indices`` as ``[len(indices), size, size, 3]`` uint8.

        ``cues`` overrides which cue types are present (e.g. ``["texture"]`` renders every image
        with its texture and nothing else of its category) — for probing which cues a classifier
        or an encoder relies on. The rest of each scene (noise, distractors, jitter) is unchanged.
        """
        indices = list(indices)
        forced = None
        if cues is not None:
            bad = [c for c in cues if c not in CUE_TYPES]
            if bad:
                raise DataError(f"unknown cue type {bad[0]!r}; cue types: {', '.join(CUE_TYPES)}")
            forced = np.array([t in cues for t in CUE_TYPES])
        out = np.empty((len(indices), self.size, self.size, 3), np.uint8)
        for start in range(0, len(indices), chunk):
            rows = [self._rows[i] for i in indices[start:start + chunk]]
            uniforms = np.empty((len(rows), _DRAWS))
            noise = np.empty((len(rows), self.size, self.size, 3), np.float32)
            for j, (c, n) in enumerate(rows):
                rng = self._rng(c, n)
                uniforms[j] = rng.random(_DRAWS)
                noise[j] = rng.standard_normal((self.size, self.size, 3), dtype=np.float32)
            values = np.array([cue_values(c) for c, _ in rows]).reshape(-1, len(CUE_TYPES))
            out[start:start + len(rows)] = _render(_scene(uniforms, values, forced), noise, self.size)
        return out

    def _rng(self, category: str, n: int) -> np.random.Generator:
        """The generator of image ``n`` of ``category``: depends on nothing else (not on groups)."""
        return np.random.default_rng([self.seed, *_CATEGORY_KEY[category][1:], n])


_CATEGORY_KEY = {c: (g, gi, ci) for gi, (g, cats) in enumerate(BUILTIN_GROUPS.items()) for ci, c in enumerate(cats)}


def cue_values(category: str) -> tuple[int, int, int, int]:
    """Value index of each cue type (``CUE_TYPES`` order) of a built-in category."""
    group, _, k = _CATEGORY_KEY[category]
    return ASSIGNMENT[group][k]
