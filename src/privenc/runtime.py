"""Process-wide settings for fast CPU work, applied by the command line and its worker processes.

Two things that a training or verification process on a CPU should not pay for:

- **OpenMP threads spinning at barriers** (``OMP_WAIT_POLICY=PASSIVE``): when the cores are
  shared (the demo's and the grid's parallel workers, anything else on the machine) spinning
  threads stall each other. OpenMP reads the variable once, when torch loads it, so it must
  be set before torch is imported; a value set by the user wins.
- **Page faults on every large tensor** (``mallopt``): glibc's malloc serves blocks above its
  mmap threshold with fresh ``mmap`` pages and trims freed memory at the top of the heap back
  to the kernel, so a loop that allocates and frees the same few-megabyte activations every
  step may fault every page of them in again, every step (docs/performance.md, "CPU
  allocator", has the counts). Raising the mmap threshold to its maximum (32 MiB) and the trim
  threshold to 1 GiB keeps freed blocks in the heap for reuse; the price is that the process
  keeps its peak heap instead of returning it between steps.

``PRIVENC_MALLOC_TUNING=0`` leaves glibc's defaults alone; on other C libraries (macOS, musl)
nothing is changed.

Progress bars that no command argument reaches (building the image cache, deep inside data
preparation) follow ``PRIVENC_PROGRESS``: the command line sets it to 0 for ``-q`` and
``--no-progress``, and worker processes inherit it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""The largest value glibc accepts (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems); blocks
above it (paper-size activations) are still mapped and unmapped each time."""
TRIM_THRESHOLD = 2**30

_applied: bool | None = None


def set_openmp_wait_policy() -> None:
    """Sleeping OpenMP threads unless the user chose otherwise; effective only before torch loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as described above (once per process); True if it was applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if _switched_off("PRIVENC_MALLOC_TUNING"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (or no libc found): leave the allocator alone
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # gnu_get_libc_version exists only in glibc: musl has a mallopt that ignores these options
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def tune_process() -> None:
    """Both settings; call first thing in a command or a worker process."""
    set_openmp_wait_policy()
    keep_freed_memory()


def progress_enabled() -> bool:
    """False when ``PRIVENC_PROGRESS`` is 0 (set by ``-q`` / ``--no-progress``)."""
    return not _switched_off("PRIVENC_PROGRESS")


def disable_progress() -> None:
    """No progress bars in this process and the processes it starts."""
    os.environ["PRIVENC_PROGRESS"] = "0"


def _switched_off(variable: str) -> bool:
    """Whether an on-by-default environment switch is set to 0 / false / no / off."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")
