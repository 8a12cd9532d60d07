"""The demo pipeline (``make demo``): the whole method on the embedded synthetic scenes.

Two encoders for the same private and desirable task — label flip (the paper's) and standard
GAN — then verification of both and of the Identity and Naive Blur baselines on the private
task, the desirable task and one other task, then the report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from privenc.config import Config, load_config
from privenc.grid import run_grid
from privenc.report import build_report
from privenc.train import train

log = logging.getLogger(__name__)

ENCODER_LOSSES = ("label_flip", "standard_gan")


def run_demo(out_dir: Path, config: Config | None = None, other_task: str | None = None, jobs: int = 1,
             progress: bool = True) -> Path:
    """Run the demo into ``out_dir`` (finished steps are reused on a rerun); returns report.md."""
    config = config or load_config("demo")
    out_dir = Path(out_dir)
    started = time.time()
    runs = []
    for loss in ENCODER_LOSSES:
        run_dir = out_dir / "runs" / loss
        runs.append(str(run_dir))
        if (run_dir / "encoder.pt").exists():
            log.info("demo: %s already trained, reusing it", run_dir)
            continue
        variant = replace(config, train=replace(config.train, encoder_loss=loss))
        log.info("demo: training the %s encoder (%d + %d iterations)", loss, config.train.warmup_iters,
                 config.train.iters)
        train(variant, run_dir, resume=(run_dir / "checkpoints" / "last.pt").exists(), progress=progress)
    tasks = [*config.train.private[:1], *config.train.desirable[:1]]
    tasks.append(other_task or _other_task(config, tasks))
    log.info("demo: verifying %d encoders on %s", len(runs) + 2, ", ".join(tasks))
    run_grid([*runs, "identity", "blur"], tasks, config, out_dir / "grid", jobs=jobs)
    build_report([out_dir / "runs", out_dir / "grid"], out_dir / "report")
    log.info("demo: finished in %.1f min", (time.time() - started) / 60)
    return out_dir / "report" / "report.md"


def _other_task(config: Config, taken: list[str]) -> str:
    from privenc.data import open_source

    source = open_source(config.data)
    for categories in source.groups.values():
        if taken[0] in categories:
            return next(c for c in categories if c not in taken)
    raise ValueError(f"no other category in the group of {taken[0]}")
