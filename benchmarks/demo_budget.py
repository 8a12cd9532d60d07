"""Where a finished demo's time went, against what this CPU can compute.

    python benchmarks/demo_budget.py DEMO_OUT          # a folder written by `make demo` / `privenc demo`
    python benchmarks/demo_budget.py DEMO_OUT --out docs/demo-budget.md

For each stage of the demo (the two trainings, every verification cell) it counts the FLOPs
of the work that stage did (``torch.utils.flop_counter`` on the ``meta`` device, 2 FLOPs per
multiply-add of convolutions and matrix products, as in ``flops.py``), reads the seconds the
stage took from its own records (``metrics.jsonl``'s last ``elapsed_s``, each cell's
``seconds``), and divides. The yardstick is measured here, in the same run, on one thread: a
3x3 convolution at the demo's largest map (forward and backward, channels-last) and a square
matrix product, once alone and once in two processes at the same time (the demo runs its
stages two at a time, which shares the memory bandwidth and the last-level cache). A stage
far below the yardstick spends its time outside convolutions and matrix products
(normalization, pooling, the optimizer, data, Python); a stage near it can
only get faster by doing less arithmetic.

Counted: training = warm-up iterations x one classifier step + adversarial iterations x
(classifier_steps classifier steps + one encoder step); a cell = its attacker's iterations x
one forward and backward pass at the verification batch, plus the validation and test
forward passes it made (one per evaluation on the curve, then three at the end). Not
counted: the within-training validation batches, encoding the cell's data (its encoder runs
once per image and view, outside the cell's timed ``seconds``), and element-wise work.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from privenc.config import load_config  # noqa: E402
from privenc.models import build_attacker, build_encoder  # noqa: E402
from privenc.runtime import tune_process  # noqa: E402

from flops import iteration_flops  # noqa: E402


def training_flops(config) -> float:
    t = config.train
    per = iteration_flops(config)
    return t.warmup_iters * per["classifier_step"] + t.iters * (t.classifier_steps * per["classifier_step"]
                                                                + per["encoder_step"])


def training_seconds(records: list[dict]) -> float:
    """Seconds of training in a metrics log. ``elapsed_s`` restarts from 0 when a run is resumed,
    so a resumed run's time is the sum of each session's last value."""
    total, previous = 0.0, 0.0
    for record in records:
        if record["elapsed_s"] < previous:  # a new session began
            total += previous
        previous = record["elapsed_s"]
    return total + previous


def attacker_flops(config, kind: str, family: str, batch: int) -> tuple[float, float]:
    """(forward + backward FLOPs of one attacker step at ``batch``, forward FLOPs per image)."""
    size = config.data.image_size
    with torch.device("meta"):
        encoder = build_encoder(kind, config.encoder, size)
        channels, height, _ = encoder.eval()(torch.empty(2, 3, size, size)).shape[1:]
        attacker = build_attacker(family, config.classifier, channels, 2, height)
        x = torch.empty(batch, channels, height, height)
        labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(attacker(x), labels).backward()
    step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        attacker(x[:1])
    return float(step), float(counter.get_total_flops())


def _median_seconds(fn, seconds: float = 3.0, warmup: int = 2) -> float:
    """Median time of ``fn`` over calls repeated for ``seconds`` (long enough for two processes
    started together to overlap for most of their measurement)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def yardsticks(config, batch: int, seconds: float = 3.0) -> dict[str, float]:
    """GFLOP/s of one thread on the demo's largest convolution (fwd + bwd) and on a matmul."""
    size = config.data.image_size
    width = max(max(stage) for stage in config.classifier.stages[:1])  # the attacker's first stage
    conv = torch.nn.Conv2d(width, width, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(batch, width, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()

    def conv_step():
        conv(x).sum().backward()

    with FlopCounterMode(display=False) as counter:
        conv_step()
    conv_flops = counter.get_total_flops()
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return {
        f"conv {width}->{width} 3x3 at {size}x{size}, batch {batch}, fwd+bwd":
            conv_flops / _median_seconds(conv_step, seconds) / 1e9,
        "matmul 1024^3": 2 * 1024 ** 3 / _median_seconds(lambda: a @ b, seconds) / 1e9,
    }


def _yardstick_worker(config_dict: dict, batch: int, seconds: float, barrier, results) -> None:
    from privenc.config import from_dict

    tune_process()
    torch.set_num_threads(1)
    config = from_dict(config_dict)
    barrier.wait()  # both processes measure at the same time
    results.put(yardsticks(config, batch, seconds))


def yardsticks_side_by_side(config, batch: int, seconds: float = 3.0) -> dict[str, float]:
    """The yardsticks in two single-thread processes at once; the mean of the two, per yardstick."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_yardstick_worker, args=(config.to_dict(), batch, seconds, barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    measured = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return {name: statistics.mean(m[name] for m in measured) for name in measured[0]}


def _gflop(flops: float) -> str:
    """GFLOP, whole above 100 (the demo's), three significant digits below (tiny test runs)."""
    value = flops / 1e9
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def budget(demo: Path, seconds: float = 3.0) -> str:
    """The report as Markdown; ``seconds``: how long each yardstick is timed."""
    config = load_config(str(demo / "runs" / "label_flip" / "config.toml"))
    v = config.verify
    rows = []
    train_flops = training_flops(config)
    for run in sorted((demo / "runs").iterdir()):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows.append((f"train {run.name}", records[-1]["step"], train_flops, training_seconds(records)))
    for path in sorted((demo / "grid" / "cells").glob("*/verify.json")):
        for record in json.loads(path.read_text()):
            kind = record["encoder_kind"]
            step, forward = attacker_flops(config, kind, record["attacker"], v.batch_size)
            evaluations = len(record["curve"]) * record["n_val"] + record["n_val"] + 2 * record["n_test"]
            flops = record["iters"] * step + evaluations * forward
            rows.append((f"cell {path.parent.name} ({record['attacker']})", record["iters"], flops, record["seconds"]))
    torch.set_num_threads(1)
    alone = yardsticks(config, v.batch_size, seconds)
    paired = yardsticks_side_by_side(config, v.batch_size, seconds)
    best = next(value for name, value in paired.items() if name.startswith("conv"))  # the players are convnets
    out = [f"Demo folder: `{demo}`. Yardsticks measured in this run, one thread per process (GFLOP/s):", "",
           "| yardstick | alone | two processes at once |", "|---|---|---|"]
    out += [f"| {name} | {alone[name]:.1f} | {paired[name]:.1f} |" for name in alone]
    out += ["", "Stages against the convolution measured two at a time, as the demo ran them:", "",
            "| stage | iterations | GFLOP | seconds | GFLOP/s | of the convolution |", "|---|---|---|---|---|---|"]
    for name, iters, flops, seconds in rows:
        rate = flops / max(seconds, 1e-6) / 1e9  # a tiny cell may round to 0 s
        out.append(f"| {name} | {iters} | {_gflop(flops)} | {seconds:.1f} | {rate:.1f} | {rate / best:.0%} |")
    total_flops = sum(r[2] for r in rows)
    total_seconds = sum(r[3] for r in rows)
    out.append(f"| all stages (CPU-seconds) | | {_gflop(total_flops)} | {total_seconds:.1f} | "
               f"{total_flops / total_seconds / 1e9:.1f} | {total_flops / total_seconds / 1e9 / best:.0%} |")
    out += ["", "At the convolution's rate the counted work alone would take "
            f"{total_flops / best / 1e9:.0f} CPU-seconds, "
            f"{total_flops / best / 1e9 / 2:.0f} s of wall time on two cores; the stages took "
            f"{total_seconds:.0f} CPU-seconds."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="a folder written by `privenc demo` (runs/ and grid/ inside)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    if not (args.demo / "runs").is_dir() or not (args.demo / "grid" / "cells").is_dir():
        parser.error(f"{args.demo} is not a finished demo folder (no runs/ and grid/cells/ inside)")
    tune_process()
    text = budget(args.demo)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
