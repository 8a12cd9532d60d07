"""Places-365 in its official layout (the paper's data, Sec. 4.1).

The layout, as downloaded::

    root/categories_places365.txt        "/a/airfield 0" per line (365 lines)
    root/places365_train_standard.txt    "/a/airfield/00000001.jpg 0" per line (1.8M lines)
    root/data_256/a/airfield/00000001.jpg   (small images; preferred) or root/data_large/...

The paper splits the official *training* list into its own disjoint train/val/test, so only
that list is read; ``places365_val.txt`` (whose images live elsewhere) is ignored. Categories
are named without their ``/x/`` prefix (``army_base``, ``arena/hockey``). Only images of
categories that appear in the groups are kept, which is what makes a 1.8M-line list cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from privenc.config import PLACES_GROUPS
from privenc.data.base import close_matches
from privenc.data.files import FileSource, digest, file_stamp, missing_files, resolve_groups
from privenc.errors import DataError

log = logging.getLogger(__name__)

CATEGORIES_FILE = "categories_places365.txt"
TRAIN_LIST = "places365_train_standard.txt"
IMAGE_FOLDERS = ("data_256", "data_large")
"""Image folders in order of preference: the 256x256 images are all the paper needs (224 crops)."""


class Places365Source(FileSource):
    """The images of the group categories listed in ``places365_train_standard.txt``.

    ``ids`` are the list's paths without the leading slash (``a/airfield/00000001.jpg``), so a
    recorded split stays valid whether the images come from ``data_256`` or ``data_large``.
    ``check_files=False`` skips the existence check, leaving missing files to the bad-image
    handling of the loader (``data.skip_bad_images``).
    """

    def __init__(
        self,
        root: Path | str,
        groups: Mapping[str, list[str]] | None = None,
        *,
        check_files: bool = True,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Places-365 root {root} does not exist or is not a folder")
        groups = dict(groups) if groups else dict(PLACES_GROUPS)
        category_file = root / CATEGORIES_FILE
        paths_by_label = read_categories(category_file)
        label_by_name = {category_name(path): label for label, path in paths_by_label.items()}

        # Every group name must be a Places-365 category before we read 1.8M lines.
        for group, names in groups.items():
            for name in names:
                if name not in label_by_name:
                    raise DataError(
                        f"group {group!r}: {name!r} is not a Places-365 category of {category_file}"
                        f"{close_matches(name, label_by_name)}"
                    )
        wanted = {n for names in groups.values() for n in names}
        list_file = root / TRAIN_LIST
        ids, categories, lines = _read_list(
            list_file,
            {str(label_by_name[n]): (n, paths_by_label[label_by_name[n]]) for n in wanted},
            set(paths_by_label),
        )
        present = set(categories)
        if not present:
            raise DataError(
                f"{list_file} lists no images for any group category ({', '.join(sorted(wanted))})"
            )
        self.empty_categories = tuple(sorted(wanted - present))
        self.groups = resolve_groups(groups, present, self.empty_categories, str(list_file))

        image_root = next((root / f for f in IMAGE_FOLDERS if (root / f).is_dir()), None)
        if image_root is None:
            raise DataError(f"no image folder in {root}: expected {' or '.join(IMAGE_FOLDERS)}/")
        if check_files:
            missing = missing_files(image_root, ids)
            if missing:
                first = missing[0]
                raise DataError(
                    f"image file missing: {image_root / ids[first]} (listed at {list_file}:"
                    f"{lines[first]}); {len(missing)} of {len(ids)} listed images are missing"
                )

        self.name = "places365"
        self.root = root
        self.image_root = image_root
        self.ids = ids
        self.attributes = {"category": categories}
        self.content_key = digest([file_stamp(list_file), image_root.name, sorted(present)])
        log.info(
            "Places-365: %d images of %d categories from %s (%s)",
            len(ids), len(present), list_file, image_root.name,
        )


def category_name(path: str) -> str:
    """``/a/arena/hockey`` -> ``arena/hockey``: the official path without its letter folder."""
    return path.strip("/").split("/", 1)[-1]


def read_categories(path: Path) -> dict[int, str]:
    """Official category list -> {label: "/a/airfield"}; malformed lines name their number."""
    if not path.is_file():
        raise DataError(f"Places-365 category list missing: {path}")
    result: dict[int, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit() or parts[0].count("/") < 2:
                raise DataError(
                    f"{path}:{lineno}: malformed line {line.strip()!r}; expected '/a/airfield 0'"
                )
            label = int(parts[1])
            if label in result:
                raise DataError(f"{path}:{lineno}: label {label} already used by {result[label]!r}")
            result[label] = parts[0]
    if not result:
        raise DataError(f"Places-365 category list {path} is empty")
    return result


def _read_list(
    path: Path, wanted: dict[str, tuple[str, str]], labels: set[int]
) -> tuple[list[str], list[str], list[int]]:
    """Stream the official file list, keeping entries of ``wanted`` labels.

    ``wanted`` maps a label *as written* ("18") to (category name, official path "/a/army_base"),
    so the common case costs one split and one dict look-up per line. Every line is still
    validated: a malformed line or unknown label is an error naming the line.
    Returns (ids, category of each id, line number of each id).
    """
    if not path.is_file():
        raise DataError(f"Places-365 file list missing: {path}")
    label_strings = {str(label) for label in labels}
    ids: list[str] = []
    categories: list[str] = []
    lines: list[int] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) == 2:
                hit = wanted.get(parts[1])
                if hit is None:
                    if parts[1] in label_strings:
                        continue
                    if parts[1].isdigit() and int(parts[1]) in labels:  # e.g. "007"
                        hit = wanted.get(str(int(parts[1])))
                        if hit is None:
                            continue
                    else:
                        raise DataError(
                            f"{path}:{lineno}: unknown label {parts[1]!r} (not in {CATEGORIES_FILE})"
                        )
                name, prefix = hit
                if not parts[0].startswith(prefix + "/"):
                    raise DataError(
                        f"{path}:{lineno}: {parts[0]!r} is labelled {parts[1]} ({name}) but does "
                        f"not lie under {prefix}/"
                    )
                if ".." in parts[0].split("/"):
                    raise DataError(f"{path}:{lineno}: path {parts[0]!r} escapes the category folder {prefix}/")
                if parts[0] in first_line:  # one image twice could land in two splits: a leak
                    raise DataError(
                        f"{path}:{lineno}: duplicated path {parts[0]!r} (also on line {first_line[parts[0]]})"
                    )
                first_line[parts[0]] = lineno
                ids.append(parts[0].lstrip("/"))
                categories.append(name)
                lines.append(lineno)
            elif parts:
                raise DataError(
                    f"{path}:{lineno}: malformed line {line.strip()!r}; expected "
                    f"'/a/airfield/00000001.jpg 0'"
                )
    return ids, categories, lines
