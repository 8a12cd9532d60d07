"""What every image source provides."""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Iterable

import numpy as np


class Source(ABC):
    """A labelled image collection: one row per image.

    Subclasses fill ``ids`` (a stable identifier per image: its path relative to the dataset
    root, or a synthetic id), ``attributes`` (attribute name -> one string value per image;
    every source has ``category``) and ``groups`` (group name -> categories; binary detection
    tasks draw negatives from the positive category's group), and implement :meth:`load`.
    """

    name: str
    ids: list[str]
    attributes: dict[str, list[str]]
    groups: dict[str, list[str]]
    empty_categories: tuple[str, ...] = ()
    """Categories the source knows of (named in a group, listed in its category file) but that
    have no images. They are dropped from ``groups`` with a warning, and a task that names one
    fails saying so instead of calling the name unknown."""

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def load(self, index: int) -> np.ndarray:
        """Image ``index`` as an RGB ``uint8`` array of shape (H, W, 3) at its native size."""

    def load_many(self, indices: list[int]) -> list[np.ndarray]:
        """Images ``indices`` (as :meth:`load`); sources that generate images in bulk (synthetic)
        override this, since building the image cache calls it in chunks."""
        return [self.load(i) for i in indices]

    def fingerprint(self) -> str:
        """A string that changes whenever the images behind this source change (cache key)."""
        return f"{type(self).__name__}:{self.name}:{len(self.ids)}"


def close_matches(name: str, options: Iterable[str], limit: int = 5) -> str:
    """A ``; did you mean ...`` suffix for error messages about an unknown name (empty if none).

    Category names are long and easy to misspell (``archaelogical_excavation`` is the official
    spelling), so every "unknown X" error of the data layer suggests the nearest valid names.
    """
    matches = difflib.get_close_matches(name, list(options), n=limit, cutoff=0.6)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
