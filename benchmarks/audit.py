"""The audit's time at demo size (issue 16's target: the zoo search of one encoder on one task
within 10 minutes on 2 cores, the full audit's time beside it).

    python benchmarks/audit.py --encoder RUN --task g1c0 [--max-rounds 2] [--jobs 2] [--out FILE]

RUN is a trained demo-size run folder (``privenc train --config demo``, or ``make demo``'s
``demo-out/runs/label_flip``); the benchmark audits it into a fresh temporary folder (nothing is
reused from an earlier audit but the reconstruction attack's raw-image attacker, which
``CACHE/attackers/`` keeps across encoders: remove it to time a first audit) and prints the wall
time of the zoo search and of the whole audit, and a table of the attackers' own seconds per
round and family (their sum over parallel workers, so it can exceed the wall time). Run it on
an idle machine: the times are what it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from privenc.runtime import keep_freed_memory, tune_process  # noqa: E402  (imports no torch)

tune_process()
keep_freed_memory()

from privenc.audit import audit  # noqa: E402
from privenc.encoders import verification_config  # noqa: E402

from measure import git_revision, load_average, machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="a trained run folder (demo size)")
    parser.add_argument("--task", default="g1c0", help="the task to audit (default g1c0, the demo's private task)")
    parser.add_argument("--max-rounds", type=int, default=2, help="round budget, round 0 included (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel attacker processes (default 2)")
    parser.add_argument("--attacks", default=None, help="comma-separated attacks (default: every one that applies)")
    parser.add_argument("--out", type=Path, default=None, help="also append the table to this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    load_before = load_average()
    config = verification_config([args.encoder], None, [])
    attacks = args.attacks.split(",") if args.attacks else None
    with tempfile.TemporaryDirectory(prefix="privenc-bench-audit-") as tmp:
        out = Path(tmp) / "audit"
        started = time.time()
        kwargs = {"attacks": attacks} if attacks else {}
        result = audit(args.encoder, config, [args.task], out, max_rounds=args.max_rounds, jobs=args.jobs,
                       progress=False, **kwargs)
        wall = time.time() - started
        trials = [json.loads(p.read_text()) for p in sorted((out / "trials").rglob("*.json"))]
        extra = {p.stem: json.loads(p.read_text()) for p in sorted((out / "attacks").rglob("*.json"))}
    per_round: dict[tuple[int, str], float] = defaultdict(float)
    for trial in trials:
        per_round[(trial["round"], trial["attacker"])] += trial["seconds"]
    verdict = result["verdicts"][args.task]
    worst = verdict["worst_case"]
    # the extra attacks start only once the task's search has stopped, so its rounds' wall time is the search's
    search = sum(result["round_seconds"][args.task])
    lines = [f"### `python benchmarks/audit.py --encoder {args.encoder} --task {args.task} --max-rounds "
             f"{args.max_rounds} --jobs {args.jobs}`", "",
             f"- machine: {', '.join(f'{k}: {v}' for k, v in machine().items())}",
             f"- load average before {load_before}, after {load_average()}",
             f"- commit: {git_revision()}; {os.cpu_count()} cores",
             f"- the zoo search (its rounds, encodings included): **{search:.0f} s** wall ({search / 60:.1f} min)",
             f"- whole audit: **{wall:.0f} s** wall ({wall / 60:.1f} min); rounds run: {verdict['rounds_run']}, "
             f"stopped by {verdict['stopped_by']}",
             f"- worst case: {worst.get('attack', 'zoo')} `{worst['attacker']}` lr {worst['lr']:g}, test balanced "
             f"accuracy {100 * worst['test_bacc_best']:.1f}% [{100 * worst['test_bacc_ci95'][0]:.1f}, "
             f"{100 * worst['test_bacc_ci95'][1]:.1f}]; plain verify {100 * verdict['plain_verify_test_bacc']:.1f}%",
             "", "| round | family | attackers' seconds (sum) |", "|---|---|---|"]
    lines += [f"| {k} | {family} | {seconds:.0f} |" for (k, family), seconds in sorted(per_round.items())]
    for name, saved in extra.items():
        records = saved.get("records", [])
        lines.append(f"| {name} | {len(records)} attackers | {sum(r.get('seconds', 0) for r in records):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
