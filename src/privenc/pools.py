"""Pools of spawned worker processes that do not outlive the command that started them.

The demo, the grid, the sweep and the audit run their trainings and attackers in a
``ProcessPoolExecutor``. Left alone, its workers survive their parent: a command stopped with
``kill`` (SIGTERM, or SIGKILL) leaves each worker finishing its current task, which may be a
training of many minutes, on cores that the next command then shares unknowingly. Two guards:

- each worker polls its parent and exits when the parent is gone, whatever killed it;
- a pool left by an interruption (Ctrl-C, or SIGTERM, which the command line turns into one)
  terminates its workers instead of waiting for their tasks, as ``with ProcessPoolExecutor``
  would. A task that fails is not an interruption: the other tasks still run to their end, as
  before, so that a sweep with one bad run still trains the rest, and the error comes after.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing import get_context

PARENT_POLL_S = 1.0
"""How often a worker checks that its parent still lives; it is gone within this of it."""


def _exit_with_parent(parent: int) -> None:
    # The pool's initializer, in the worker: a daemon thread, so the task itself is untouched.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # orphaned: no one will read the result, and no cleanup of ours is pending

    threading.Thread(target=watch, name="privenc-parent-watch", daemon=True).start()


@contextmanager
def spawn_pool(workers: int, cancel_on_error: bool = False) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes (fork is unsafe beside torch's
    threads) that exit with their parent, and that are terminated, not awaited, when the block
    is left by an interruption (an exception that is not an ``Exception``: KeyboardInterrupt,
    SystemExit, the command line's SIGTERM). When a task fails, the tasks not started yet still
    run unless ``cancel_on_error``; the running ones finish either way."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        yield pool
    except Exception:
        pool.shutdown(wait=True, cancel_futures=cancel_on_error)
        raise
    except BaseException:
        stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def stop_workers(pool: ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """Cancel what has not started and terminate the workers (SIGTERM, then SIGKILL after
    ``grace_s``), so that their running tasks stop now."""
    # The executor keeps its processes in a private mapping until shutdown clears it (Python
    # 3.14 has terminate_workers() for this; 3.11 to 3.13 do not).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    pool.shutdown(wait=True, cancel_futures=True)
