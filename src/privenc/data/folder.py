"""A plain class-per-folder tree: ``root/<category>/**/<image>``.

Each direct subfolder of ``root`` is a category; its images may sit in nested subfolders.
Files whose names do not end in an image extension (``.txt``, ``.DS_Store``) and hidden
entries are ignored; files directly in ``root`` belong to no category and are skipped with a
warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from privenc.data.files import FileSource, digest, resolve_groups
from privenc.data.images import IMAGE_EXTENSIONS
from privenc.errors import DataError

log = logging.getLogger(__name__)


class FolderSource(FileSource):
    """Images of a class-per-folder tree; ``attributes = {"category": folder name}``.

    ``groups`` empty means one group ``all`` of every category (binary detection: a category
    against all the others). Group names must be folders; empty folders are dropped from the
    groups with a warning.
    """

    def __init__(self, root: Path | str, groups: Mapping[str, list[str]] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder root {root} does not exist or is not a folder")
        ids: list[str] = []
        categories: list[str] = []
        stamps: list[tuple[str, int, int]] = []
        empty: list[str] = []
        stray = 0
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                stray += entry.name.lower().endswith(IMAGE_EXTENSIONS)
                continue
            found = _images_under(Path(entry.path), entry.name)
            if not found:
                empty.append(entry.name)
            for rel, size, mtime in found:
                ids.append(rel)
                categories.append(entry.name)
                stamps.append((rel, size, mtime))
        if stray:
            log.warning("%d image(s) directly in %s belong to no category folder; ignored", stray, root)
        if not ids:
            raise DataError(
                f"no images found under {root}: expected one subfolder per category holding "
                f"{'/'.join(IMAGE_EXTENSIONS)} files"
            )
        if empty:
            log.warning("category folders without images in %s: %s; ignored", root, ", ".join(empty))
        present = sorted(set(categories))
        self.empty_categories = tuple(empty)
        self.groups = (
            resolve_groups(groups, present, empty, str(root)) if groups else {"all": present}
        )
        self.name = "folder"
        self.root = root
        self.image_root = root
        self.ids = ids
        self.attributes = {"category": categories}
        # Per-file size and mtime: a folder has no list file whose stamp would reveal edits.
        self.content_key = digest([digest(stamps), present])
        log.info("folder %s: %d images of %d categories", root, len(ids), len(present))


def _images_under(folder: Path, prefix: str) -> list[tuple[str, int, int]]:
    """(id relative to the root, size, mtime_ns) of every image file below ``folder``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        base = prefix if rel_dir == "." else f"{prefix}/{rel_dir}"
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            stat = os.stat(os.path.join(dirpath, name))
            found.append((f"{base}/{name}", stat.st_size, stat.st_mtime_ns))
    found.sort()
    return found
