"""What the three file-backed sources (Places-365 lists, class folders, CSV manifests) share:
loading by path, checking that listed files exist, resolving category groups, and a
fingerprint that follows the files on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from privenc.data.base import Source, close_matches
from privenc.data.images import read_image
from privenc.errors import DataError

log = logging.getLogger(__name__)


class FileSource(Source):
    """A source whose image ``i`` is the file ``image_root / ids[i]``.

    Subclasses set ``name``, ``ids``, ``attributes``, ``groups``, ``image_root`` and
    ``content_key``: a short string that changes when the listing behind the source changes
    (the list or CSV file's size and mtime, or the folder's file stats) and that names the
    selected categories, so the image cache is rebuilt exactly when it must be.
    """

    image_root: Path
    content_key: str

    def image_path(self, index: int) -> Path:
        """Where image ``index`` lives on disk (for error messages and deployment)."""
        return self.image_root / self.ids[index]

    def load(self, index: int) -> np.ndarray:
        return read_image(self.image_path(index))

    def fingerprint(self) -> str:
        return (
            f"{type(self).__name__}:{self.name}:{self.image_root.resolve()}:{len(self.ids)}:"
            f"{self.content_key}"
        )


def digest(parts: Iterable[object]) -> str:
    """A short stable hash of ``parts`` (used in fingerprints; not for security)."""
    h = hashlib.sha1()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of ``path``: enough to notice an edited list or manifest."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def missing_files(root: Path, relative_paths: list[str]) -> list[int]:
    """Positions of ``relative_paths`` that do not exist under ``root``.

    Lists each parent folder once instead of calling ``stat`` per image: Places-365 categories
    hold thousands of files in one folder, and this keeps checking 50k images well under a
    second even on network file systems.
    """
    listings: dict[str, set[str]] = {}
    missing = []
    for position, rel in enumerate(relative_paths):
        parent, _, base = rel.rpartition("/")
        names = listings.get(parent)
        if names is None:
            try:
                names = set(os.listdir(root / parent))
            except OSError:
                names = set()
            listings[parent] = names
        if base not in names:
            missing.append(position)
    return missing


def resolve_groups(
    groups: Mapping[str, list[str]],
    present: Iterable[str],
    empty: Iterable[str],
    origin: str,
    valid: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """Check group category names against the data and drop the ones without images.

    ``present``: categories with images; ``empty``: categories the source knows of but that
    have no images (places365-mini lacks 3 of the paper's group 2): these are dropped with a
    warning, so default groups work on partial copies of a dataset. Any other name is an error
    naming ``origin`` and suggesting close matches among ``valid`` (default ``present``).
    """
    present_set, empty_set = set(present), set(empty)
    valid_names = sorted(present_set if valid is None else set(valid))
    resolved: dict[str, list[str]] = {}
    for group, categories in groups.items():
        kept, dropped = [], []
        for category in categories:
            if category in present_set:
                if category not in kept:
                    kept.append(category)
            elif category in empty_set:
                dropped.append(category)
            else:
                raise DataError(
                    f"group {group!r}: unknown category {category!r} in {origin}"
                    f"{close_matches(category, valid_names)}"
                )
        if dropped:
            log.warning("group %r: no images for %s in %s; dropped from the group", group, ", ".join(dropped), origin)
        if kept:
            resolved[group] = kept
        else:
            log.warning("group %r has no category with images in %s; dropped", group, origin)
    return resolved
