"""A grid of verification cells: encoders x tasks, the shape of the paper's Table 2.

Every cell is one ``verify`` call written to ``GRID/cells/<encoder>__<task>/verify.json``. A
cell counts as done only when that file exists, and it is written atomically, so a rerun
skips finished cells and redoes interrupted ones. Cells run in parallel processes
(``jobs``); under torchrun they are also spread over ranks (cell i runs on rank i mod world).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from privenc.checkpoint import atomic_write_text
from privenc.config import Config, from_dict

log = logging.getLogger(__name__)


def encoder_name(spec: str) -> str:
    return Path(spec).name if spec not in ("identity", "blur") else spec


def cell_dir(out_dir: Path, spec: str, task: str) -> Path:
    return Path(out_dir) / "cells" / f"{encoder_name(spec)}__{task.replace('/', '-')}"


def _run_cell(spec: str, task: str, config_dict: dict[str, Any], out: str, device: str, threads: int) -> str:
    from privenc.verify import verify

    torch.set_num_threads(threads)
    verify(spec, from_dict(config_dict), [task], Path(out), device=device, progress=False)
    return out


def run_grid(encoders: list[str], tasks: list[str], config: Config, out_dir: Path, jobs: int = 1,
             device: str = "auto") -> list[dict[str, Any]]:
    """Run every missing cell; return the records of all cells (done before or now)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cells = [(spec, task) for spec in encoders for task in tasks]
    atomic_write_text(out_dir / "grid.json", json.dumps({"encoders": encoders, "tasks": tasks}, indent=1) + "\n")
    todo = [(i, spec, task) for i, (spec, task) in enumerate(cells)
            if i % world == rank and not (cell_dir(out_dir, spec, task) / "verify.json").exists()]
    skipped = sum(1 for i in range(len(cells)) if i % world == rank) - len(todo)
    log.info("grid: %d cells, %d already done, %d to run on rank %d/%d with %d job(s)",
             len(cells), skipped, len(todo), rank, world, jobs)
    config_dict = config.to_dict()
    if jobs <= 1:
        for _, spec, task in todo:
            _run_cell(spec, task, config_dict, str(cell_dir(out_dir, spec, task)), device, torch.get_num_threads())
    elif todo:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_cell, spec, task, config_dict, str(cell_dir(out_dir, spec, task)),
                                   device, threads): (spec, task) for _, spec, task in todo}
            for future in as_completed(futures):
                future.result()
                log.info("grid: cell %s / %s done", *futures[future])
    return collect(out_dir)


def collect(out_dir: Path) -> list[dict[str, Any]]:
    """All records of the finished cells of a grid folder."""
    records: list[dict[str, Any]] = []
    for path in sorted(Path(out_dir).glob("cells/*/verify.json")):
        records.extend(json.loads(path.read_text()))
    return records
