"""The demo pipeline (``make demo``): the whole method on the embedded synthetic scenes.

Two encoders for the same private and desirable task — label flip (the paper's) and standard
GAN — then verification of both and of the Identity and Naive Blur baselines on the private
task, the desirable task and one other task, then the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from privenc.config import Config, load_config
from privenc.errors import ConfigError
from privenc.grid import run_grid
from privenc.pools import spawn_pool
from privenc.report import build_report
from privenc.runs import METRICS_FILE, config_changes, has_checkpoint, is_finished, is_run, read_config
from privenc.training import train, train_worker

log = logging.getLogger(__name__)

ENCODER_LOSSES = ("label_flip", "standard_gan")


def run_demo(out_dir: Path, config: Config | None = None, other_task: str | None = None, jobs: int = 1,
             progress: bool = True) -> Path:
    """Run the demo into ``out_dir`` (finished steps are reused on a rerun); returns report.md."""
    config = config or load_config("demo")
    out_dir = Path(out_dir)
    started = time.time()
    runs, todo = [], []
    for loss in ENCODER_LOSSES:
        run_dir = out_dir / "runs" / loss
        runs.append(str(run_dir))
        variant = replace(config, train=replace(config.train, encoder_loss=loss))
        _check_same_run_config(run_dir, variant)
        if is_finished(run_dir):
            log.info("demo: %s already trained, reusing it", run_dir)
        else:
            todo.append((variant, run_dir))
    if todo:
        log.info("demo: training %s (%d + %d iterations each)%s", ", ".join(d.name for _, d in todo),
                 config.train.warmup_iters, config.train.iters,
                 f", {min(jobs, len(todo))} in parallel" if jobs > 1 and len(todo) > 1 else "")
    if jobs > 1 and len(todo) > 1:
        # One process per encoder, the cores shared between them: small convolutions use one
        # core well and several poorly. One bar follows both through their metrics logs.
        threads = max(1, (os.cpu_count() or 1) // min(jobs, len(todo)))
        with spawn_pool(min(jobs, len(todo))) as pool:
            futures = [pool.submit(train_worker, variant.to_dict(), str(run_dir), threads) for variant, run_dir in todo]
            _follow([run_dir for _, run_dir in todo], futures, config.train.warmup_iters + config.train.iters,
                    progress)
            for future in futures:
                log.info("demo: trained %s", future.result())
    else:
        for variant, run_dir in todo:
            train(variant, run_dir, resume=has_checkpoint(run_dir), progress=progress)
    # Two tasks by default: with the strict [verify] of the demo preset a third column (Identity's
    # cells above all) would take make demo past 15 minutes on 2 cores (docs/results.md, 2026-11-30).
    tasks = [*config.train.private[:1], *config.train.desirable[:1]]
    if other_task:
        tasks.append(other_task)
    log.info("demo: verifying %d encoders on %s", len(runs) + 2, ", ".join(tasks))
    run_grid([*runs, "identity", "blur"], tasks, config, out_dir / "grid", jobs=jobs)
    build_report([out_dir / "runs", out_dir / "grid"], out_dir / "report")
    log.info("demo: finished in %.1f min", (time.time() - started) / 60)
    return out_dir / "report" / "report.md"


def _check_same_run_config(run_dir: Path, config: Config) -> None:
    """A rerun reuses finished trainings only if they were trained with this config."""
    if not is_run(run_dir):
        return
    diff = config_changes(read_config(run_dir).to_dict(), config.to_dict(), "reuse")
    if diff:
        raise ConfigError(f"{run_dir} was trained with another config than this demo asks for; use a new --out, "
                          f"or delete {run_dir.parent.parent} to start again:\n  " + "\n  ".join(diff))


def _follow(run_dirs: list[Path], futures: list, steps_each: int, progress: bool) -> None:
    """One progress bar over parallel trainings, fed by the steps their metrics logs reach."""
    bar = tqdm(total=steps_each * len(run_dirs), desc="train (parallel)", unit="it", dynamic_ncols=True,
               disable=not progress)
    while not all(f.done() for f in futures):
        time.sleep(2)
        done = 0
        for run_dir in run_dirs:
            try:
                lines = (run_dir / METRICS_FILE).read_text().splitlines()
                done += json.loads(lines[-1])["step"] if lines else 0
            except (OSError, ValueError, KeyError):
                pass  # not started yet, or a line being written: the next poll reads it
        bar.update(max(0, done - bar.n))
    bar.close()

