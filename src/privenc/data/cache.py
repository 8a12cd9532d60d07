"""Decoded images at the working resolution: a uint8 memmap cache, or decoding on each access.

Decoding a JPEG costs far more than a training step of a small encoder, and verification
trains many attackers over the same images, so by default every image is decoded once,
resized by :func:`~privenc.data.images.resize_square` to (load_size, load_size, 3) and
stored in a ``.npy`` memmap that all later runs (and DataLoader workers) share.

The cache file is named by a hash of the source's fingerprint, the load size and the images
it covers, built into a temporary file and renamed into place only when complete, so a crash
never leaves a half cache that a later run would trust. Processes that want the same cache at
the same time (the ranks of a node under torchrun, parallel grid cells) take turns on a lock
file beside it (:mod:`filelock`): the first builds, the others wait and then reuse its cache.
Where the file system has no locks, racing builders each produce a complete, identical file;
the last rename wins.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import filelock
import numpy as np
import torch.utils.data
from tqdm import tqdm

from privenc.config import DataConfig
from privenc.data.base import Source
from privenc.data.files import digest
from privenc.data.images import resize_square
from privenc.errors import DataError
from privenc.runtime import progress_enabled

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


class ImageStore(Protocol):
    """What datasets read images from: ``store[source_index]`` -> uint8 (L, L, 3)."""

    def __getitem__(self, index: int) -> np.ndarray: ...


class LazyImages:
    """Decode and resize on every access (``data.cache = false``): no disk, more CPU."""

    def __init__(self, source: Source, load_size: int) -> None:
        self.source = source
        self.load_size = load_size

    def __getitem__(self, index: int) -> np.ndarray:
        return resize_square(self.source.load(int(index)), self.load_size)


class ImageCache:
    """A read-only view of a built cache file: row k holds source image ``indices[k]``."""

    def __init__(self, path: Path, indices: np.ndarray) -> None:
        self.path = Path(path)
        self.indices = np.asarray(indices, dtype=np.int64)
        self._array: np.ndarray | None = None

    def __getitem__(self, index: int) -> np.ndarray:
        row = int(np.searchsorted(self.indices, index))
        if row >= len(self.indices) or self.indices[row] != index:
            raise KeyError(f"image {index} is not in the cache {self.path}")
        if self._array is None:  # opened lazily: once per DataLoader worker, after the fork
            self._array = np.load(self.path, mmap_mode="r")
        return self._array[row]

    def __getstate__(self) -> dict[str, Any]:
        # Ship the path, not the mapped pages, to DataLoader workers (spawn pickles datasets).
        return {**self.__dict__, "_array": None}


def default_cache_dir() -> Path:
    """``$PRIVENC_CACHE`` or ``~/.cache/privenc``."""
    env = os.environ.get("PRIVENC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "privenc"


def cache_root(cfg: DataConfig) -> Path:
    """The folder of ``cfg``'s caches: ``data.cache_dir``, else :func:`default_cache_dir`."""
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()


def cache_file(source: Source, indices: np.ndarray, load_size: int, cache_dir: Path) -> Path:
    """Where the cache of these images of ``source`` at ``load_size`` lives."""
    key = digest([source.fingerprint(), load_size, digest(np.asarray(indices, dtype=np.int64).tolist())])
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", source.name)
    return Path(cache_dir) / f"{name}-{load_size}px-{key}.npy"


def open_images(source: Source, indices: np.ndarray, cfg: DataConfig) -> tuple[ImageStore, list[int]]:
    """The image store for ``indices`` of ``source`` and the unreadable ones among them.

    cache on: build the memmap once (or reuse it). cache off: decode on access; with
    ``skip_bad_images`` a one-time validation pass finds unreadable images up front, so they
    can be left out of the splits instead of failing mid-training.
    Without ``skip_bad_images`` an unreadable image is a :class:`DataError` naming the file.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if not cfg.cache:
        bad: list[int] = []
        if cfg.skip_bad_images:
            for position, _, error in _decode(source, indices, cfg.load_size, cfg.num_workers):
                if error is not None:
                    log.warning("skipping unreadable image: %s", error)
                    bad.append(int(indices[position]))
        _report_bad(bad, len(indices))
        return LazyImages(source, cfg.load_size), sorted(bad)
    path = cache_file(source, indices, cfg.load_size, cache_root(cfg))
    meta = _read_meta(path, source, indices, cfg.load_size)
    if meta is None:
        with _exclusive(path):  # the first process builds it; the others wait, then read its cache
            meta = (_read_meta(path, source, indices, cfg.load_size)
                    or _build(path, source, indices, cfg.load_size, cfg.skip_bad_images, cfg.num_workers))
    else:
        log.info("reusing image cache %s", path)
    bad_rows = meta["bad_rows"]
    if bad_rows and not cfg.skip_bad_images:
        raise DataError(f"{meta['bad_reasons'][0]} (found while building the cache {path})")
    bad = sorted(int(indices[row]) for row in bad_rows)
    _report_bad(bad, len(indices))
    return ImageCache(path, indices), bad


def _report_bad(bad: list[int], total: int) -> None:
    if bad:
        log.warning("%d of %d images are unreadable and left out (listed in bad_images.txt)", len(bad), total)


def _read_meta(path: Path, source: Source, indices: np.ndarray, load_size: int) -> dict[str, Any] | None:
    """The description of a complete, matching cache at ``path``, or None to (re)build it."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable image cache %s (%s); rebuilding", path, err)
        return None
    expected = (len(indices), load_size, load_size, 3)
    if (meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != source.fingerprint()
            or shape != expected):
        log.warning("image cache %s does not match its source; rebuilding", path)
        return None
    return meta


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold the build lock of the cache file ``path``: a lock file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # fallback_to_soft=False: where flock is missing, filelock's soft lock would leave a marker
    # that a killed builder never removes, and every later run would wait on it; building
    # unlocked is harmless instead (see the module's docstring).
    lock = filelock.FileLock(path.with_name(f".{path.name}.lock"), fallback_to_soft=False)
    try:
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:  # before OSError: Timeout is a TimeoutError
            log.info("waiting for another process to finish the image cache %s", path)
            lock.acquire()
    except OSError as err:  # a file system without locks (some network mounts): build unlocked
        log.warning("cannot lock %s (%s); processes that need this cache now may each build it", lock.lock_file, err)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _builder_id() -> str:
    """Names this process's temporary files, unique even on storage that several hosts share."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _build(
    path: Path, source: Source, indices: np.ndarray, load_size: int, skip_bad: bool, num_workers: int
) -> dict[str, Any]:
    """Decode every image into a temporary memmap, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A memmap page that cannot be stored on a full disk kills the process (SIGBUS) with no
    # message, so check the space first.
    needed, free = len(indices) * load_size * load_size * 3, shutil.disk_usage(path.parent).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"the image cache {path} needs {needed / 2**20:.1f} MiB but {path.parent} "
                                    f"has {free / 2**20:.1f} MiB free: free some space, point data.cache_dir "
                                    f"elsewhere, or set data.cache = false")
    tmp = path.with_name(f".{path.name}.tmp-{_builder_id()}")
    bad_rows: list[int] = []
    bad_reasons: list[str] = []
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(indices), load_size, load_size, 3))
        for position, image, error in _decode(source, indices, load_size, num_workers):
            if error is not None:
                if not skip_bad:
                    raise DataError(error)
                log.warning("skipping unreadable image: %s", error)
                bad_rows.append(position)
                bad_reasons.append(error)
                continue  # the row stays zeros and is never read: the image leaves the splits
            array[position] = image
        array.flush()
        del array
        meta = {
            "format": CACHE_FORMAT, "fingerprint": source.fingerprint(), "load_size": load_size,
            "count": len(indices), "bad_rows": bad_rows, "bad_reasons": bad_reasons,
            "bad_ids": [source.ids[int(indices[r])] for r in bad_rows],
        }
        meta_path = path.with_suffix(".json")
        meta_tmp = meta_path.with_name(f".{meta_path.name}.tmp-{_builder_id()}")
        meta_tmp.write_text(json.dumps(meta, indent=1) + "\n")
        # Description first, data last: a cache file present at its final name is complete.
        os.replace(meta_tmp, meta_path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("built image cache %s (%d images)", path, len(indices))
    return meta


CHUNK = 64
"""Images decoded per work item: amortizes DataLoader messages and lets bulk sources vectorize."""


class _Decoder(torch.utils.data.Dataset):
    """Chunk c -> [(position, resized image or None, error message or None)] for the positions
    ``c * CHUNK ...`` of ``indices``.

    Errors travel back as messages: DataLoader would re-wrap an exception raised in a worker
    and lose the file name at the front of the message.
    """

    def __init__(self, source: Source, indices: np.ndarray, load_size: int) -> None:
        self.source, self.indices, self.load_size = source, indices, load_size

    def __len__(self) -> int:
        return -(-len(self.indices) // CHUNK)

    def __getitem__(self, chunk: int) -> list[tuple[int, np.ndarray | None, str | None]]:
        positions = range(chunk * CHUNK, min((chunk + 1) * CHUNK, len(self.indices)))
        try:
            images = self.source.load_many([int(self.indices[p]) for p in positions])
            return [(p, resize_square(image, self.load_size), None) for p, image in zip(positions, images)]
        except DataError:
            pass  # a bad image in the chunk: decode one by one to tell which
        out: list[tuple[int, np.ndarray | None, str | None]] = []
        for p in positions:
            try:
                out.append((p, resize_square(self.source.load(int(self.indices[p])), self.load_size), None))
            except DataError as err:
                out.append((p, None, str(err)))
        return out


def _as_is(item: Any) -> Any:
    return item


def _decode(
    source: Source, indices: np.ndarray, load_size: int, num_workers: int
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Yield (position, image, error) for every position of ``indices``, in order, decoded in
    ``num_workers`` processes when > 0, with a progress bar."""
    decoder = _Decoder(source, indices, load_size)
    if num_workers == 0:
        chunks: Iterable[list] = (decoder[c] for c in range(len(decoder)))
    else:
        chunks = torch.utils.data.DataLoader(decoder, batch_size=None, num_workers=num_workers, collate_fn=_as_is)
    with tqdm(total=len(indices), desc=f"decoding {source.name} images at {load_size}px", unit="img",
              disable=not progress_enabled()) as bar:
        for chunk in chunks:
            yield from chunk
            bar.update(len(chunk))
