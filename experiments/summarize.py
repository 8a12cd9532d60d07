"""Spread of verification results over attacker seeds and attackers, per encoder and task.

    python experiments/summarize.py results/places/grid results/places/grid-baselines

Prints, for every (encoder, task) cell of the given grid or verify folders: how many attackers
(families x seeds) were trained, the mean and standard deviation of their test accuracies, the
strongest one's test accuracy (selected on validation, as in the report) with the 95% Wilson
half-width from the number of test images, and that number of test images. The two spreads
answer different questions: the seeds' spread is how much one retraining varies; the Wilson
interval is how much the test set's size alone lets one conclude.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from privenc.report import wilson_halfwidth
from privenc.verification import strongest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="grid or verify folders (searched for verify.json)")
    args = p.parse_args()
    records = [r for folder in args.folders for path in sorted(folder.rglob("verify.json"))
               for r in json.loads(path.read_text())]
    if not records:
        p.error("no verify.json under " + ", ".join(map(str, args.folders)))
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        cells[(r["encoder"], r["task"])].append(r["test_acc_best"])
    best = strongest(records)
    print("| encoder | task | role | attackers | mean test acc | sd | strongest (95% CI) | n test |")
    print("|---|---|---|---|---|---|---|---|")
    for (encoder, task), accs in cells.items():
        b = best[(encoder, task)]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        print(f"| {encoder} | {task} | {b['role']} | {len(accs)} | {statistics.mean(accs):.3f} | {sd:.3f} "
              f"| {b['test_acc_best']:.3f} ± {wilson_halfwidth(b['test_acc_best'], b['n_test']):.3f} | {b['n_test']} |")


if __name__ == "__main__":
    main()
