"""Side-by-side timing on a noisy, shared machine.

Every comparison runs its variants interleaved in one process: round r times each variant
once, alternating the order between rounds so that neither always runs first (caches, CPU
frequency, a neighbour's burst of work). Single times mean little on such a machine; the
median of the rounds and the ratio of medians within the same run are what we report.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def interleave(variants: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Rates (units per second) of every variant, ``repeats`` interleaved rounds each.

    A variant is a callable that does one timed unit of work and returns how many units it did
    (images, iterations). ``warmup`` untimed calls of each variant come first (allocator,
    oneDNN primitive caches, lazily opened memmaps, DataLoader start-up).
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            started = time.perf_counter()
            done = variants[name]()
            rates[name].append(done / (time.perf_counter() - started))
    return rates


@dataclass
class Row:
    """One line of the results table: a variant of a benchmark, against its baseline."""

    benchmark: str
    variant: str
    unit: str
    rates: list[float]
    baseline: list[float] | None = None
    target: float | None = None
    """Required ratio to the baseline (e.g. 20.0 for ">= 20x"); None = reported only."""
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def ratio(self) -> float | None:
        return self.median / statistics.median(self.baseline) if self.baseline else None

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        return "PASS" if self.ratio >= self.target else "MISS"


@dataclass
class Section:
    """A benchmark's rows plus free-text findings (what is on by default and why)."""

    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compare(benchmark: str, rates: dict[str, list[float]], baseline: str, unit: str,
            targets: dict[str, float] | None = None, notes: dict[str, str] | None = None) -> list[Row]:
    """Rows for every variant of one interleaved measurement, each against ``baseline``."""
    targets, notes = targets or {}, notes or {}
    rows = []
    for name, values in rates.items():
        is_base = name == baseline
        rows.append(Row(benchmark, name + (" (baseline)" if is_base else ""), unit, values,
                        None if is_base else rates[baseline], targets.get(name), notes.get(name, "")))
    return rows


def fmt_rate(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu,
        "cores": f"{usable} usable ({os.cpu_count()} online)",
        "torch": torch.__version__,
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op (defaults)",
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def one_minute_load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def git_revision() -> str:
    """The checked-out commit, short, with "+ uncommitted changes" when the tree differs from it:
    runs.git_revision (what run folders record) in the form the benchmark notes print."""
    from privenc.runs import git_revision as revision

    found = revision()
    if found is None:
        return "unknown (no git here)"
    return found.removesuffix("-dirty")[:9] + (" + uncommitted changes" if found.endswith("-dirty") else "")


def as_is(image: torch.Tensor) -> torch.Tensor:
    """The identity transform: a module-level function, so DataLoader workers can pickle it."""
    return image
