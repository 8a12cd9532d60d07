"""Wall time and peak memory of ``privenc demo`` (the ``make demo`` job), in a subprocess.

    python benchmarks/demo_cost.py                 # the real demo (targets: <= 10 min, <= 4 GB)
    python benchmarks/demo_cost.py --quick         # a tiny config, to check that it works
    python benchmarks/demo_cost.py --set train.iters=200 --keep demo-cost-out

Memory is reported three ways: the peak RSS of the largest single process
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, which covers the demo's verification
workers too once they are reaped), and the peaks of the summed PSS and summed RSS of the whole
process tree, sampled from /proc every 2 s (the demo trains, then verifies in parallel worker
processes, so the sum is what must fit in the machine; its memory rises and falls in steps of
minutes, not spikes). Reading PSS walks each process's page tables: sampling every 0.2 s took
about a quarter of one core away from a demo that needs both. The target applies to the summed PSS
(shared pages counted once); the summed RSS, which counts the shared libraries once per
process, is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QUICK = ["train.warmup_iters=5", "train.iters=10", "train.log_every=5", "train.checkpoint_every=10",
         "verify.max_iters=20", "verify.eval_every=10", "verify.patience=1", "verify.views=1"]
TARGET_MINUTES, TARGET_GB = 10.0, 4.0


def _tree_memory(root: int) -> tuple[int, int]:
    """(summed PSS, summed RSS) in bytes of ``root`` and its descendants, from /proc.

    PSS (proportional set size) shares each shared page among the processes mapping it, so
    the sum is the memory the tree really holds; RSS counts the shared torch libraries once
    per process and overstates it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        children.setdefault(parent, []).append(int(entry))
    pss = rss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


def measure(overrides: list[str], out_dir: Path, jobs: int | None = None, every: float = 2.0) -> dict[str, float]:
    """Run ``privenc demo --out out_dir`` with ``overrides``; wall time and peak memory."""
    command = [sys.executable, "-m", "privenc", "-q", "demo", "--out", str(out_dir), "--no-progress"]
    command += [f"--set={item}" for item in overrides]
    if jobs:
        command += ["--jobs", str(jobs)]
    peak = [0, 0]  # PSS, RSS
    started = time.time()
    process = subprocess.Popen(command)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every):
            pss, rss = _tree_memory(process.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    done.set()
    sampler.join()
    wall = time.time() - started
    if code != 0:
        raise SystemExit(f"privenc demo failed with exit code {code}: {' '.join(command)}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    return {"wall_s": wall, "peak_tree_pss_bytes": float(peak[0]), "peak_tree_rss_bytes": float(peak[1]),
            "peak_process_rss_bytes": float(largest), "command": " ".join(command)}


def section(quick: bool):
    """The result as a benchmarks Section (for ``run.py --demo``)."""
    from measure import Section

    with tempfile.TemporaryDirectory(prefix="privenc-demo-cost-") as tmp:
        result = measure(QUICK if quick else [], Path(tmp) / "demo")
    return Section("make demo", notes=[summary(result, quick)])


def summary(result: dict, quick: bool) -> str:
    minutes, gb = result["wall_s"] / 60, result["peak_tree_pss_bytes"] / 1e9
    what = "a changed config (--quick or --set), not the real demo: " if quick else ""
    return (f"{what}`{result['command']}`: {minutes:.1f} min (target <= {TARGET_MINUTES:g}: "
            f"{'PASS' if minutes <= TARGET_MINUTES else 'MISS'}), peak memory {gb:.2f} GB PSS summed over its "
            f"processes (target <= {TARGET_GB:g}: {'PASS' if gb <= TARGET_GB else 'MISS'}); summed RSS "
            f"{result['peak_tree_rss_bytes'] / 1e9:.2f} GB, largest single process "
            f"{result['peak_process_rss_bytes'] / 1e9:.2f} GB.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny config, to check that it works")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to privenc demo (repeatable)")
    parser.add_argument("--jobs", type=int, default=None, help="passed to privenc demo")
    parser.add_argument("--keep", type=Path, default=None, help="demo output folder to keep (default: a temp folder)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples (default 2)")
    args = parser.parse_args(argv)
    overrides = (QUICK if args.quick else []) + args.overrides
    with tempfile.TemporaryDirectory(prefix="privenc-demo-cost-") as tmp:
        out = args.keep or Path(tmp) / "demo"
        result = measure(overrides, out, args.jobs, args.sample_every)
    print(json.dumps(result, indent=1))
    print(summary(result, bool(overrides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
