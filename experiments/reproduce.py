"""Reproduce the paper's central experiments (issue 5) with the `privenc` command line.

Trains the encoders of Table 1 (label flip, standard GAN, negative CE: -A +B), of a Table 2
slice (-A with the variance constraint only, -A +B, -A +B,C) and of the normalization ablation
(-A, variance constraint, with each of the four normalizations); verifies every encoder and the
Identity / Naive Blur baselines on tasks A, B and the others in one grid; builds the report.

    python experiments/reproduce.py --config demo --out results/synthetic \\
        --tasks g1c0 g1c1 g1c2 g1c3 --jobs 2

Every step is a plain `privenc` command, printed before it runs, so each number in the report
can be traced to a command. Finished runs and cells are skipped, so an interrupted
reproduction is resumed by running the same command again. ``--seeds 0 1 2`` trains the
label-flip and standard-GAN encoders once per seed (Table 1 with spread over training seeds).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NORMS = ("none", "batch", "per_location_affine", "per_location")


def runs(a: str, b: str, c: str, seeds: list[int]) -> dict[str, list[str]]:
    """Run name -> --set overrides. Names say what each encoder does, as in the paper's rows."""
    keep_b = [f"train.private=[\"{a}\"]", f"train.desirable=[\"{b}\"]"]
    spec: dict[str, list[str]] = {}
    for seed in seeds:
        suffix = "" if seed == seeds[0] else f"-seed{seed}"
        spec[f"label_flip{suffix}"] = keep_b + ["train.encoder_loss=\"label_flip\"", f"train.seed={seed}"]
        spec[f"standard_gan{suffix}"] = keep_b + ["train.encoder_loss=\"standard_gan\"", f"train.seed={seed}"]
    spec["negative_ce"] = keep_b + ["train.encoder_loss=\"negative_ce\""]
    spec[f"keep_{b}_{c}"] = [f"train.private=[\"{a}\"]", f"train.desirable=[\"{b}\",\"{c}\"]"]
    for norm in NORMS:  # -A with the variance constraint only, one run per normalization
        spec[f"variance_{norm}"] = [f"train.private=[\"{a}\"]", "train.desirable=[]", f"encoder.norm=\"{norm}\""]
    return spec


def command(args: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(x) for x in args), flush=True)
    started = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL if "--no-progress" in args else None)
    print(f"  done in {time.time() - started:.0f} s: {' '.join(args[1:3])} ...", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo", help="preset or TOML file (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every run and for the grid (repeatable)")
    p.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="extra overrides for the Identity / Naive Blur grid (e.g. verify.seeds=[0]: attackers "
                        "on raw images cost the most); with any, the baselines get their own grid folder")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help="A (private), B (desirable), C (second desirable), then more tasks to verify")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds of the Table 1 encoders")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--jobs", type=int, default=2, help="trainings / grid cells in parallel")
    p.add_argument("--only", nargs="+", metavar="RUN", help="train and verify only these runs")
    args = p.parse_args()
    if len(args.tasks) < 3:
        p.error("--tasks needs at least A, B and C")
    a, b, c = args.tasks[:3]
    privenc = str(Path(sys.executable).with_name("privenc"))
    sets = [x for kv in args.overrides for x in ("--set", kv)]
    common = ["--config", args.config, *sets]
    spec = runs(a, b, c, args.seeds)
    if args.only:
        unknown = sorted(set(args.only) - set(spec))
        if unknown:
            p.error(f"unknown runs {unknown}; the runs are {', '.join(spec)}")
        spec = {k: v for k, v in spec.items() if k in args.only}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    started = time.time()

    def train(name: str) -> None:
        run = args.out / "runs" / name
        if (run / "encoder.pt").exists():
            print(f"  {run} is finished; skipped", flush=True)
            return
        if (run / "checkpoints" / "last.pt").exists():
            # A resumed run reads its own config.toml: no --config, the --set values on top of it.
            how = [*sets, "--resume", str(run), "--allow-config-change"]
        else:
            if run.exists():  # a run that failed before its first checkpoint: nothing to resume
                print(f"  {run} has no checkpoint; starting it again", flush=True)
                shutil.rmtree(run)
            how = [*common, "--out", str(run)]
        command([privenc, "train", *how, *[x for kv in spec[name] for x in ("--set", kv)], "--no-progress"])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(train, spec))
    encoders = [str(args.out / "runs" / name) for name in spec]
    grids = [args.out / "grid"]
    if args.baseline_overrides:
        grids.append(args.out / "grid-baselines")
        command([privenc, "grid", *common, *[x for kv in args.baseline_overrides for x in ("--set", kv)],
                 "--encoders", "identity", "blur", "--tasks", *args.tasks, "--out", str(grids[1]),
                 "--jobs", str(args.jobs)])
    else:
        encoders += ["identity", "blur"]
    command([privenc, "grid", *common, "--encoders", *encoders, "--tasks", *args.tasks,
             "--out", str(grids[0]), "--jobs", str(args.jobs)])
    command([privenc, "report", *encoders[:len(spec)], *map(str, grids), "--out", str(args.out / "report")])
    print(f"reproduction finished in {(time.time() - started) / 60:.1f} min: {args.out / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
