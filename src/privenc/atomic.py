"""Writing files so that a crash, a kill or a full disk never leaves half of one behind.

Every file privenc writes that another command later reads (checkpoints, encoders, configs,
splits, verification results, shards) goes through :func:`atomic_write_bytes`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``:
    a crash at any point leaves either the old file or the new one, never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise naming(err, f"cannot write {path}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # disk full, quota, I/O error: say which file, and what is left
            raise naming(err, f"cannot write {path}", f"; the previous {path.name}, if any, is unchanged") from None
        raise


def read_finished(path: Path, then: str) -> Any | None:
    """The JSON of a result that was written atomically (a grid cell, an audit trial, an extra
    attack), or None when it is missing or unreadable, so that the caller computes it again:
    an edited or cut-short copy is recomputed, never trusted. ``then`` says, in the warning,
    what happens instead. The caller checks the shape."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("%s is unreadable (%s); %s", path, err, then)
        return None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and write and remove a probe file in it, so that a command whose
    results are written at the end (verification, a training run) fails before its work
    starts rather than after hours of it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".privenc-write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise naming(err, f"the output folder {folder} is not writable") from None


def naming(err: OSError, what: str, tail: str = "") -> OSError:
    """The same kind of OSError (same errno, so ``except PermissionError`` still works), with a
    message that names the file: a bare "[Errno 28] No space left on device" names nothing."""
    message = f"{what}: {err.strerror or err}{tail}"
    return OSError(err.errno, message) if err.errno is not None else OSError(message)
