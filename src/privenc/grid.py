"""A grid of verification cells: encoders x tasks, the shape of the paper's Table 2.

Every cell is one ``verify`` call written to ``GRID/cells/<encoder>__<task>/verify.json``. A
cell counts as done only when that file exists, and it is written atomically, so a rerun
skips finished cells and redoes interrupted ones. Cells run in parallel processes
(``jobs``); under torchrun they are also spread over ranks (cell i runs on rank i mod world),
each rank working alone: a cell is never run inside a process group (see :func:`run_grid`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

import torch

from privenc import distributed
from privenc.atomic import atomic_write_text, ensure_writable, read_finished
from privenc.config import Config, from_dict
from privenc.encoders import check_tasks, encoder_name, load_encoder_spec
from privenc.errors import ConfigError
from privenc.pools import spawn_pool
from privenc.runs import config_changes, refuse_run_folder
from privenc.verification import verify

log = logging.getLogger(__name__)


def cell_dir(out_dir: Path, spec: str, task: str) -> Path:
    return Path(out_dir) / "cells" / f"{encoder_name(spec)}__{task.replace('/', '-')}"


def _run_cell(spec: str, task: str, config_dict: dict[str, Any], out: str, device: str, threads: int) -> str:
    from privenc.runtime import keep_freed_memory

    keep_freed_memory()  # a spawned worker: the command line's setting is not inherited
    torch.set_num_threads(threads)
    verify(spec, from_dict(config_dict), [task], Path(out), device=device, progress=False, overwrite=True)
    return out


def run_grid(encoders: list[str], tasks: list[str], config: Config, out_dir: Path, jobs: int = 1,
             device: str = "auto", ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run every missing cell; return the records of all cells (done before or now).

    A rerun with another config is refused: its cells would be mixed with the earlier ones.
    ``ignore``: keys that may differ (see :func:`check_same_config`)."""
    out_dir = Path(out_dir)
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    check_cells(encoders, tasks, config)  # before any cell runs: a typo must not cost hours first
    refuse_run_folder(out_dir, "grid")
    ensure_writable(out_dir)
    launched = distributed.launched()
    rank, world = launched.rank, launched.size
    if distributed.under_torchrun():  # each rank on its own GPU, as in training
        device = str(distributed.resolve_device(device, launched.local_rank))
    cells = [(spec, task) for spec in encoders for task in tasks]
    config_dict = config.to_dict()
    check_same_config(out_dir, config_dict, ignore)
    if rank == 0:  # written once; every rank has checked it above
        atomic_write_text(out_dir / "grid.json",
                          json.dumps({"encoders": encoders, "tasks": tasks, "config": config_dict}, indent=1) + "\n")
    todo = [(i, spec, task) for i, (spec, task) in enumerate(cells)
            if i % world == rank and not _cell_done(cell_dir(out_dir, spec, task))]
    # Longest first: attackers on raw images (Identity) cost several times a cell on encodings;
    # started last, they would leave the other workers idle at the end.
    todo.sort(key=lambda cell: cell[1] != "identity")
    skipped = sum(1 for i in range(len(cells)) if i % world == rank) - len(todo)
    log.info("grid: %d cells, %d already done, %d to run on rank %d/%d with %d job(s)",
             len(cells), skipped, len(todo), rank, world, jobs)
    # A process in a process group (a sweep under torchrun keeps the one of its trainings) runs
    # its cells in spawned processes, which are in none: here the attackers' batch norms would
    # all-reduce with the other ranks' unrelated cells, mixing their statistics, and hang as soon
    # as the ranks' shares differ.
    if jobs <= 1 and not distributed.group_open():
        for _, spec, task in todo:
            _run_cell(spec, task, config_dict, str(cell_dir(out_dir, spec, task)), device, torch.get_num_threads())
    elif todo:
        threads = torch.get_num_threads() if jobs <= 1 else max(1, (os.cpu_count() or 1) // jobs)
        with spawn_pool(jobs) as pool:
            futures = {pool.submit(_run_cell, spec, task, config_dict, str(cell_dir(out_dir, spec, task)),
                                   device, threads): (spec, task) for _, spec, task in todo}
            for future in as_completed(futures):
                future.result()
                log.info("grid: cell %s / %s done", *futures[future])
    return collect(out_dir)


def check_cells(encoders: list[str], tasks: list[str], config: Config) -> None:
    """Refuse, before any work, a grid whose cells would share a folder, an encoder that is
    neither a baseline nor a loadable trained encoder, and a task its data does not have."""
    for kind, given, names in (("encoders", encoders, [encoder_name(e) for e in encoders]),
                               ("tasks", tasks, [t.replace("/", "-") for t in tasks])):
        seen: dict[str, str] = {}
        for name, spec in zip(names, given):
            if name in seen:
                twice = seen[name] == spec or (kind == "encoders"
                                               and Path(seen[name]).resolve() == Path(spec).resolve())
                same = "is listed twice" if twice else f"and {seen[name]!r} share the cell name {name!r}"
                raise ConfigError(f"grid {kind}: {spec!r} {same}; every cell needs its own folder "
                                  f"(GRID/cells/<encoder>__<task>): rename or drop one")
            seen[name] = spec
    # Each encoder as its cells will load it (a truncated or foreign file fails here, naming it),
    # with the data they will use: a run folder's own, else the grid's.
    data = [load_encoder_spec(spec, config, torch.device("cpu")).config.data for spec in encoders]
    for distinct in {json.dumps(dataclasses.asdict(d), sort_keys=True): d for d in data}.values():
        check_tasks(distinct, tasks)


def check_same_config(out_dir: Path, config_dict: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
    """Refuse a grid folder whose cells were computed with another config (what grid.json
    recorded); callers that do hours of work before the grid (a sweep) ask before it.
    ``ignore``: ``section.key`` names allowed to differ, a sweep's varied keys: each run folder
    brings its own value, so the base config's (a preset's default) is read by no cell."""
    path = Path(out_dir) / "grid.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("config")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = None  # grid.json is rewritten below; the cells are what matter
    new = json.loads(json.dumps(config_dict))  # as it would read back
    diff = config_changes(old, new, "grid", ignore) if old is not None else []
    if not diff:
        return
    raise ConfigError(f"refusing to add to the grid {path.parent} with another config than its cells were "
                      f"computed with ({path}); use a new --out, or delete the folder:\n  " + "\n  ".join(diff))


def _cell_done(folder: Path) -> bool:
    """A cell is done when its verify.json holds a complete list of records. It is written
    atomically, so anything else (a copy cut short, an edited file) is recomputed, never read."""
    records = read_finished(folder / "verify.json", "grid: recomputing that cell")
    return isinstance(records, list) and bool(records)


def collect(out_dir: Path) -> list[dict[str, Any]]:
    """All records of the finished cells of a grid folder."""
    records: list[dict[str, Any]] = []
    for path in sorted(Path(out_dir).glob("cells/*/verify.json")):
        if _cell_done(path.parent):
            records.extend(json.loads(path.read_text()))
    return records
