"""Reproduce the paper's central experiments (issues 5 and 17) with the `privenc` command line.

Trains the encoders of Table 1 (label flip, standard GAN, negative CE: -A +B), of a Table 2
slice (-A with the variance constraint only, -A +B, -A +B,C) and of the normalization ablation
(-A, variance constraint, with each of the four normalizations); verifies every encoder and the
Identity / Naive Blur baselines on tasks A, B and the others in one grid; optionally audits
every trained encoder on its private task; builds the report.

    python experiments/reproduce.py --config demo --out results/synthetic \\
        --tasks g1c0 g1c1 g1c2 g1c3 --jobs 2

Every step is a plain `privenc` command, printed before it runs, so each number in the report
can be traced to a command; ``--dry-run`` prints them without running any. Finished runs and
cells are skipped (and an audit resumes itself), so an interrupted reproduction is resumed by
running the same command again.

``--seeds 0 1 2`` trains every Table 1 and Table 2 encoder once per seed; the report groups
runs that differ only in ``train.seed`` and shows the mean ± sd over seeds. The normalization
ablation, the costliest and least compared, gets ``--ablation-seeds`` (default: the first seed
only). ``--tables`` trains the encoders of some tables only. ``--audit-rounds R`` adds, after
the grid, ``privenc audit RUN --task A --max-rounds R`` of every trained encoder into
``OUT/audits/<run>``; the report then shows the audit's worst case in the private task's cells.

Tasks may be categories (``g1c0``) or attributes (``attribute:gender``): run names replace ':'
and '/' so that they stay folder names. With two tasks only (A and B) the -A +B,C encoder is
left out with a note. ``--also TASK...`` adds columns that no encoder trains for without making
the first of them C (on faces: ``--tasks attribute:gender attribute:smiling --also
attribute:expression``, the paper's slice with expression as an attribute nobody hid or kept).
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

from privenc.errors import PrivencError

NORMS = ("none", "batch", "per_location_affine", "per_location")
TABLES = ("table1", "table2", "ablation")
DEFAULT_NORM = "per_location"
"""The encoder's default normalization (the paper's): Table 2's variance-only row uses it."""


def folder_name(task: str) -> str:
    """A task as part of a run name: ``attribute:gender`` -> ``attribute-gender``."""
    return task.replace(":", "-").replace("/", "-")


def runs(a: str, b: str, c: str | None, seeds: list[int], tables: tuple[str, ...] = TABLES,
         ablation_seeds: list[int] | None = None, norm: str = DEFAULT_NORM) -> dict[str, list[str]]:
    """Run name -> --set overrides. Names say what each encoder does, as in the paper's rows.

    Every Table 1 and Table 2 encoder is trained once per seed of ``seeds``; the ablation's
    once per seed of ``ablation_seeds`` (default: the first seed). The first seed's runs keep
    the plain name (``label_flip``) and the others get ``-seed<N>``, so the folders of a
    reproduction run before seeds existed are resumed, not trained again. ``c`` None leaves
    out the -A +B,C encoder. ``norm`` is the config's encoder.norm: Table 2's -A row (the
    variance constraint only) is the ablation run with that normalization.
    """
    ablation_seeds = seeds[:1] if ablation_seeds is None else ablation_seeds
    keep_b = [f"train.private=[\"{a}\"]", f"train.desirable=[\"{b}\"]"]
    # Table 2 and the ablation are the paper's label-flip encoders, whatever loss the preset
    # defaults to (faces defaults to standard GAN, its best measured operating point).
    flip = ["train.encoder_loss=\"label_flip\""]
    variance = [f"train.private=[\"{a}\"]", "train.desirable=[]", *flip]
    planned: list[tuple[str, list[str]]] = []  # (name, overrides) before the seed
    if "table1" in tables:
        planned += [(loss, keep_b + [f"train.encoder_loss=\"{loss}\""])
                    for loss in ("label_flip", "standard_gan", "negative_ce")]
    if "table2" in tables:
        planned.append(("label_flip", keep_b + flip))  # -A +B
        if c is not None:
            planned.append((f"keep_{folder_name(b)}_{folder_name(c)}",
                            [f"train.private=[\"{a}\"]", f"train.desirable=[\"{b}\",\"{c}\"]", *flip]))
        planned.append((f"variance_{norm}", variance + [f"encoder.norm=\"{norm}\""]))
    spec: dict[str, list[str]] = {}
    for seed in seeds:
        for name, overrides in planned:
            spec[_seeded(name, seed, seeds[0])] = overrides + [f"train.seed={seed}"]
    if "ablation" in tables:  # -A with the variance constraint only, one run per normalization
        for seed in ablation_seeds:
            for each in NORMS:
                spec[_seeded(f"variance_{each}", seed, seeds[0])] = variance + [f"encoder.norm=\"{each}\"",
                                                                                 f"train.seed={seed}"]
    return spec


def _seeded(name: str, seed: int, first: int) -> str:
    return name if seed == first else f"{name}-seed{seed}"


def show(args: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(x) for x in args), flush=True)


def command(args: list[str]) -> None:
    show(args)
    started = time.time()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL if "--no-progress" in args else None)
    print(f"  done in {time.time() - started:.0f} s: {' '.join(args[1:3])} ...", flush=True)


def config_norm(config: str, overrides: list[str]) -> str:
    """encoder.norm of the config every run starts from (a preset or TOML file, then --set)."""
    from privenc.config import load_config

    return load_config(config, overrides).encoder.norm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo", help="preset or TOML file (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every run and for the grid (repeatable; the verify.* ones also reach the "
                        "audits)")
    p.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="extra overrides for the Identity / Naive Blur grid (e.g. verify.seeds=[0]: attackers "
                        "on raw images cost the most); with any, the baselines get their own grid folder")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help="A (private), B (desirable), C (second desirable; without it no -A +B,C encoder), then "
                        "more tasks to verify; categories or attribute:<name>")
    p.add_argument("--also", nargs="+", default=[], metavar="TASK",
                   help="tasks verified as columns that no encoder trains for, without making them C (faces: "
                        "--tasks attribute:gender attribute:smiling --also attribute:expression)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="training seeds of every Table 1 and Table 2 encoder (default: 0)")
    p.add_argument("--ablation-seeds", nargs="+", type=int, metavar="SEED",
                   help="training seeds of the normalization ablation (default: the first of --seeds)")
    p.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES),
                   help="train the encoders of these tables only (default: all three)")
    p.add_argument("--audit-rounds", type=int, default=0, metavar="R",
                   help="after the grid, privenc audit every trained encoder on its private task with "
                        "--max-rounds R into OUT/audits/<run> (default 0: no audit)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--jobs", type=int, default=2, help="trainings / grid cells / audit attackers in parallel")
    p.add_argument("--only", nargs="+", metavar="RUN", help="train, verify and audit only these runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args()
    if len(args.tasks) < 2:
        p.error("--tasks needs at least A (private) and B (desirable)")
    columns = [*args.tasks, *args.also]  # every task the grid verifies
    if len(set(columns)) != len(columns):
        p.error(f"--tasks and --also list a task twice: {' '.join(columns)}")
    for flag, seeds in (("--seeds", args.seeds), ("--ablation-seeds", args.ablation_seeds or [])):
        if len(set(seeds)) != len(seeds):
            p.error(f"{flag} lists a seed twice: {' '.join(map(str, seeds))}")
    if args.audit_rounds < 0:
        p.error(f"--audit-rounds must be 0 (no audit) or more, got {args.audit_rounds}")
    a, b = args.tasks[:2]
    c = args.tasks[2] if len(args.tasks) > 2 else None
    if c is None and "table2" in args.tables:
        print(f"note: two tasks only: the -A +B,C encoder of Table 2 is left out (give a third task C after {b})",
              flush=True)
    privenc = str(Path(sys.executable).with_name("privenc"))
    sets = [x for kv in args.overrides for x in ("--set", kv)]
    common = ["--config", args.config, *sets]
    try:
        norm = config_norm(args.config, args.overrides)
    except PrivencError as err:  # a typo in --config or --set: said before anything runs
        p.error(str(err))
    spec = runs(a, b, c, args.seeds, tuple(args.tables), args.ablation_seeds, norm)
    if args.only:
        unknown = sorted(set(args.only) - set(spec))
        if unknown:
            p.error(f"unknown runs {unknown}; the runs are {', '.join(spec)}")
        spec = {k: v for k, v in spec.items() if k in args.only}
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    started = time.time()
    step = show if args.dry_run else command

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
                if not args.dry_run:
                    shutil.rmtree(run)
            how = [*common, "--out", str(run)]
        step([privenc, "train", *how, *[x for kv in spec[name] for x in ("--set", kv)], "--no-progress"])

    if args.dry_run:  # in order, so that the printed plan reads top to bottom
        for name in spec:
            train(name)
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(train, spec))
    encoders = [str(args.out / "runs" / name) for name in spec]
    grids = [args.out / "grid"]
    if args.baseline_overrides:
        grids.append(args.out / "grid-baselines")
        step([privenc, "grid", *common, *[x for kv in args.baseline_overrides for x in ("--set", kv)],
                 "--encoders", "identity", "blur", "--tasks", *columns, "--out", str(grids[1]),
                 "--jobs", str(args.jobs)])
    else:
        encoders += ["identity", "blur"]
    step([privenc, "grid", *common, "--encoders", *encoders, "--tasks", *columns,
             "--out", str(grids[0]), "--jobs", str(args.jobs)])
    audits = []
    if args.audit_rounds:
        # The run's own config.toml is audited (it holds the --set values it was trained with);
        # only the verify.* overrides are passed, which the grid's verification used too.
        verify_sets = [x for kv in args.overrides if kv.strip().startswith("verify.") for x in ("--set", kv)]
        for name in spec:  # every run here hides A, the one private task an audit is asked about
            folder = args.out / "audits" / name
            step([privenc, "audit", str(args.out / "runs" / name), "--task", a, "--max-rounds",
                     str(args.audit_rounds), "--jobs", str(args.jobs), *verify_sets, "--out", str(folder),
                     "--no-progress"])
            audits.append(str(folder))
    step([privenc, "report", *encoders[:len(spec)], *map(str, grids), *audits, "--out", str(args.out / "report")])
    if args.dry_run:
        print(f"dry run: {len(spec)} runs planned; nothing was run")
    else:
        print(f"reproduction finished in {(time.time() - started) / 60:.1f} min: {args.out / 'report' / 'report.md'}")


if __name__ == "__main__":
    main()
