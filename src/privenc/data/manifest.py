"""A CSV manifest for any labelled image collection (faces with demographic attributes, ...).

Format: a header row with a ``path`` column and one column per attribute::

    path,gender,age_group
    img/0001.jpg,female,adult

Paths are relative to the CSV file's folder and may not leave it. Every other column becomes
an attribute; ``category_attribute`` names the one binary detection tasks use and the splits
are drawn per value of (it is also exposed as ``category``). Left at its default, ``category``,
it is that column if the CSV has one, else the first attribute column. The ``path`` and
category cells must be filled; an empty cell in another column means "unknown" and excludes
that image from tasks on that attribute.
"""

from __future__ import annotations

import csv
import logging
import posixpath
from collections.abc import Mapping
from pathlib import Path

from privenc.data.files import FileSource, digest, file_stamp, missing_files, resolve_groups
from privenc.errors import DataError

log = logging.getLogger(__name__)

PATH_COLUMN = "path"
DEFAULT_CATEGORY = "category"
_CATEGORY_WHY = ": splits are drawn per category"


class CsvSource(FileSource):
    """Images listed in a CSV manifest, with one attribute per non-``path`` column.

    ``check_files=False`` skips the existence check, leaving missing files to the bad-image
    handling of the loader (``data.skip_bad_images``).
    """

    def __init__(
        self,
        csv_path: Path | str,
        category_attribute: str = DEFAULT_CATEGORY,
        groups: Mapping[str, list[str]] | None = None,
        *,
        check_files: bool = True,
    ) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(f"CSV manifest {csv_path} does not exist or is not a file")
        header, rows = read_csv(csv_path)
        if PATH_COLUMN not in header:
            raise DataError(
                f"{csv_path}: no {PATH_COLUMN!r} column; columns are {', '.join(header) or '(none)'}"
            )
        attribute_columns = [c for c in header if c != PATH_COLUMN]
        chosen = category_attribute == DEFAULT_CATEGORY and DEFAULT_CATEGORY not in header and attribute_columns
        if chosen:
            category_attribute = attribute_columns[0]
            log.info("CSV %s has no 'category' column: splits and detection tasks use its first attribute "
                     "column, %r (data.category_attribute chooses another)", csv_path, category_attribute)
        if category_attribute not in header or category_attribute == PATH_COLUMN:
            raise DataError(
                f"{csv_path}: no column {category_attribute!r} (data.category_attribute); "
                f"attribute columns are {', '.join(attribute_columns) or '(none)'}"
            )
        if category_attribute != DEFAULT_CATEGORY and DEFAULT_CATEGORY in header:
            raise DataError(
                f"{csv_path}: has a 'category' column but data.category_attribute = "
                f"{category_attribute!r}; rename one of them so 'category' means one thing"
            )

        path_col, cat_col = header.index(PATH_COLUMN), header.index(category_attribute)
        ids: list[str] = []
        lines: list[int] = []
        first_line: dict[str, int] = {}
        for lineno, row in rows:
            for col in (path_col, cat_col):
                if not row[col]:
                    why = "" if col == path_col else (
                        f" (the CSV has no 'category' column, so its first attribute column is the category"
                        f"{_CATEGORY_WHY}, and every image needs one; set data.category_attribute to another "
                        f"column)" if chosen else
                        f" (the category column, data.category_attribute{_CATEGORY_WHY}, and every image needs one)")
                    raise DataError(f"{csv_path}:{lineno}: empty cell in column {header[col]!r}{why}")
            rel = relative_path(row[path_col], csv_path, lineno)
            if rel in first_line:
                raise DataError(
                    f"{csv_path}:{lineno}: duplicated path {row[path_col]!r} (also on line {first_line[rel]})"
                )
            first_line[rel] = lineno
            ids.append(rel)
            lines.append(lineno)
        if not ids:
            raise DataError(f"{csv_path}: no rows after the header")

        image_root = csv_path.parent
        if check_files:
            missing = missing_files(image_root, ids)
            if missing:
                first = missing[0]
                raise DataError(
                    f"{csv_path}:{lines[first]}: image file missing: {image_root / ids[first]}; "
                    f"{len(missing)} of {len(ids)} listed images are missing"
                )

        attributes = {
            column: [row[i] for _, row in rows] for i, column in enumerate(header) if i != path_col
        }
        attributes["category"] = attributes[category_attribute]
        present = sorted(set(attributes["category"]))
        if chosen and len(ids) > 1 and len(present) == len(ids):  # an id or file-name column
            raise DataError(
                f"{csv_path}: no 'category' column, and its first attribute column {category_attribute!r} has a "
                f"different value on every row, so it cannot be the category{_CATEGORY_WHY}, each with several "
                f"images; add a 'category' "
                f"column or set data.category_attribute to one of: {', '.join(attribute_columns)}"
            )
        self.groups = resolve_groups(groups, present, (), str(csv_path)) if groups else {"all": present}
        self.name = "csv"
        self.root = image_root
        self.image_root = image_root
        self.ids = ids
        self.attributes = attributes
        self.content_key = digest([file_stamp(csv_path), category_attribute, present])
        log.info("CSV %s: %d images, attributes %s", csv_path, len(ids), ", ".join(attributes))


def read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, stripped cells) of each non-blank row; ragged rows are errors."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row with a 'path' column") from None
        except csv.Error as err:
            raise DataError(f"{path}:1: {err}") from None
        except UnicodeDecodeError as err:  # e.g. a spreadsheet's cp1252 export
            raise DataError(f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8") from None
        duplicated = sorted({h for h in header if header.count(h) > 1})
        if duplicated:
            raise DataError(f"{path}:1: duplicated column(s) {', '.join(map(repr, duplicated))}")
        rows = []
        try:
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(row)} cells, but the header has {len(header)}"
                    )
                rows.append((reader.line_num, [cell.strip() for cell in row]))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: {err}") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text after line {reader.line_num} ({err.reason}); "
                            f"save it as UTF-8") from None
    return header, rows


def relative_path(path: str, csv_path: Path, lineno: int) -> str:
    """Normalize a manifest path and refuse one that leaves the CSV's folder.

    The check is lexical (``a/../../x`` is caught; a symlink inside the folder is trusted), so
    a manifest cannot make the loader read arbitrary files by accident.
    """
    if posixpath.isabs(path) or Path(path).is_absolute():
        raise DataError(f"{csv_path}:{lineno}: absolute path {path!r}; paths must be relative to the CSV's folder")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise DataError(f"{csv_path}:{lineno}: path {path!r} escapes the CSV's folder {csv_path.parent}")
    return norm
