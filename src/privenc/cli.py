"""The ``privenc`` command line: thin subcommands that build a config and call the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from privenc import __version__

log = logging.getLogger("privenc")


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = "demo", default_help: str = "") -> None:
    parser.add_argument("--config", default=default, metavar="PRESET|FILE",
                        help=f"a preset name or a TOML file (default: {default_help or default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.iters=500 (repeatable)")


RUN_CONFIG_HELP = ("the config.toml of the first trained encoder's run (its [verify] settings and data), "
                   "else demo")


def _config_from_args(args: argparse.Namespace):
    from privenc.config import load_config

    return load_config(args.config, args.overrides)


# --------------------------------------------------------------------------- subcommands


def cmd_config(args: argparse.Namespace) -> int:
    from privenc.config import preset_names

    if args.list:
        print("\n".join(preset_names()))
        return 0
    print(_config_from_args(args).to_toml(), end="")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from privenc.data import inspect

    config = _config_from_args(args)
    if args.source:
        config = _with_source(config, args.source)
    tasks = args.tasks or [*config.train.private, *config.train.desirable]
    print(inspect(config.data, tasks))
    return 0


def _with_source(config, source: str):
    """Point the data config at a source given on the command line: 'synthetic', a Places-365
    root (has categories_places365.txt), a CSV manifest, or a class-per-folder tree."""
    from privenc.config import validate

    path = Path(source)
    data = config.data
    if source == "synthetic":
        data.source, data.root = "synthetic", ""
    elif path.suffix.lower() == ".csv":
        data.source, data.root = "csv", str(path)
    elif (path / "categories_places365.txt").exists():
        data.source, data.root = "places365", str(path)
    elif path.is_dir():
        data.source, data.root = "folder", str(path)
    else:
        from privenc.data.base import DataError

        raise DataError(f"source {source!r} is not 'synthetic', a CSV file or an existing folder")
    validate(config)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from privenc import checkpoint as ckpt
    from privenc.config import ConfigError, config_diff, load_config
    from privenc.train import CHECKPOINT_FILE, train

    if args.device:
        args.overrides.append(f"train.device={args.device}")
    if args.resume and (args.out or args.config):
        given = "--out" if args.out else "--config"
        raise ConfigError(f"--resume continues {args.resume} in place with its own config.toml; drop {given} "
                          f"(change values with --set and --allow-config-change)")
    if args.allow_config_change and not args.resume:
        raise ConfigError("--allow-config-change only applies with --resume")
    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {saved} does not exist (is {run_dir} a training run folder?)")
        checkpoint = run_dir / CHECKPOINT_FILE
        if not checkpoint.is_file():
            raise ConfigError(f"cannot resume {run_dir}: it has no checkpoint yet ({checkpoint}; stopped before "
                              f"the first one); start it again with --out {run_dir}")
        config = load_config(str(saved), args.overrides)
        # Compare with what the checkpoint was trained with, not only with config.toml: an edited
        # config.toml would otherwise change the run silently.
        # The device is where the run continues, not what it computes: a run may move between machines.
        state = ckpt.load(checkpoint)
        diff = config_diff(state["config"], config.to_dict(), ignore=("train.device",))
        # Verification settings do not change what training computes: accepted, and recorded.
        verify_changes = [line for line in diff if line.startswith("verify.")]
        diff = [line for line in diff if not line.startswith("verify.")]
        end = config.train.warmup_iters + config.train.iters
        if state["step"] > end:
            raise ConfigError(f"cannot resume {run_dir} to end at step {end}: its checkpoint is at step "
                              f"{state['step']} already (a run cannot be shortened; train a new one)")
        if diff and not args.allow_config_change:
            raise ConfigError(f"refusing to resume with a changed config (pass --allow-config-change to accept; "
                              f"the checkpoint {checkpoint} was trained with the left-hand values):\n  "
                              + "\n  ".join(diff))
        if diff:
            log.warning("resuming %s with a changed config:\n  %s", run_dir, "\n  ".join(diff))
        if verify_changes:
            log.info("verification settings of %s changed:\n  %s", run_dir, "\n  ".join(verify_changes))
        if diff or verify_changes:
            ckpt.atomic_write_text(saved, config.to_toml())
        path = train(config, run_dir, resume=True, progress=not args.no_progress)
    else:
        if not args.out:
            raise ConfigError("privenc train needs --out RUN (a new run folder) or --resume RUN")
        run_dir = Path(args.out)
        if (run_dir / CHECKPOINT_FILE).exists():
            raise ConfigError(f"{run_dir} already holds a training run; use --resume {run_dir} or another --out")
        # What train() itself creates first (checkpoints/, temporary files) marks a run stopped
        # before its config was written; anything else is somebody's files. Rank 0 alone checks:
        # under torchrun the other ranks may look while rank 0 is creating the run.
        foreign = [p.name for p in run_dir.iterdir() if p.name != "checkpoints" and not p.name.startswith(".")] \
            if run_dir.is_dir() else []
        if foreign and not (run_dir / "config.toml").is_file() and int(os.environ.get("RANK", "0")) == 0:
            raise ConfigError(f"{run_dir} is not empty and not a training run folder (it holds {foreign[0]!r}); "
                              f"give a new or empty --out")
        args.config = args.config or "demo"
        config = _config_from_args(args)
        path = train(config, run_dir, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"encoder: {path}")
    return 0


def _verification_config(args: argparse.Namespace, encoders: list[str]):
    """``--config``, else the config of the first trained encoder's run: its [verify] settings
    (a paper-preset run is verified by the paper's protocol) and its data (the baselines of a
    grid see the same images), else the demo preset. ``--set`` applies on top; a trained encoder
    brings its own data, encoder and classifier config, so the --set values outside verify.* that
    it replaces are named in a warning (in a grid they still reach the baselines)."""
    from privenc.config import config_diff, load_config
    from privenc.verify import BASELINES, run_folder_of

    runs = [folder for folder in map(run_folder_of, encoders) if folder is not None]
    verify_sets = [item for item in args.overrides if item.strip().startswith("verify.")]
    ignored = [item for item in args.overrides if item not in verify_sets]
    if runs and ignored:
        baselines = [e for e in encoders if e in BASELINES]
        log.warning("ignored for the trained encoders, which bring their own data, encoder and classifier config "
                    "(%s): %s; only verify.* settings apply to them%s",
                    ", ".join(str(run / "config.toml") for run in runs), ", ".join(ignored),
                    f" (the baselines {', '.join(baselines)} do use them, so they may see other data)"
                    if baselines else "")
    if args.config is not None:
        return _config_from_args(args)
    if not runs:
        args.config = "demo"
        return _config_from_args(args)
    args.config = str(runs[0] / "config.toml")
    config = _config_from_args(args)
    log.info("verification settings from %s (no --config given)", args.config)
    for other in runs[1:]:
        theirs = load_config(str(other / "config.toml"), verify_sets)
        diff = config_diff({"verify": theirs.to_dict()["verify"]}, {"verify": config.to_dict()["verify"]})
        if diff:
            log.warning("%s was trained with other verification settings; all cells use those of %s: %s",
                        other, args.config, "; ".join(diff))
    return config


def cmd_verify(args: argparse.Namespace) -> int:
    from privenc.verify import verify

    config = _verification_config(args, [args.encoder])
    tasks = args.tasks or config.verify.tasks or _default_tasks(args.encoder, config)
    verify(args.encoder, config, tasks, Path(args.out), device=args.device, progress=not args.no_progress)
    print((Path(args.out) / "summary.md").read_text(), end="")
    print(f"results: {Path(args.out) / 'verify.json'}")
    return 0


def _default_tasks(encoder: str, config) -> list[str]:
    """A run's own private and desirable tasks; for a baseline or an encoder file alone, the config's."""
    from privenc.config import load_config
    from privenc.verify import run_folder_of

    run = run_folder_of(encoder)
    source = load_config(str(run / "config.toml")) if run is not None else config
    return [*source.train.private, *source.train.desirable]


def cmd_grid(args: argparse.Namespace) -> int:
    from privenc.config import ConfigError
    from privenc.grid import run_grid
    from privenc.verify import summarize

    config = _verification_config(args, args.encoders)
    tasks = args.tasks or config.verify.tasks
    if not tasks:
        raise ConfigError("grid: no tasks; give --tasks or set verify.tasks")
    records = run_grid(args.encoders, tasks, config, Path(args.out), jobs=args.jobs, device=args.device)
    print(summarize(records), end="")
    print(f"cells: {Path(args.out) / 'cells'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from privenc.report import build_report

    build_report([Path(p) for p in args.inputs], Path(args.out), figures=not args.no_figures)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from privenc.demo import run_demo

    started = time.time()
    report = run_demo(Path(args.out), _config_from_args(args), jobs=args.jobs, progress=not args.no_progress)
    text = report.read_text()
    table2 = text[text.index("## Table 2"):].split("\n## ")[0] if "## Table 2" in text else text
    print(table2)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min; report: {report}")
    return 0


# --------------------------------------------------------------------------- parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privenc",
        description="Learn privacy-preserving image encoders by adversarial training and verify them "
                    "against attackers retrained on the fixed encoder (Pittaluga et al., WACV 2019).",
    )
    parser.add_argument("--version", action="version", version=f"privenc {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors (no progress bars)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an encoder adversarially (writes a run folder)",
                       description="Train an encoder against private-task classifiers with the label-flip "
                                   "loss (or train.encoder_loss = standard_gan | negative_ce), keeping utility "
                                   "by the variance constraint or desirable tasks.")
    _add_config_args(p, default=None, default_help="demo; with --resume, the run's own config.toml")
    p.add_argument("--out", metavar="RUN", help="new run folder")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config changed by --set (the differences are listed; "
                        "the device and verify.* settings may change without it)")
    p.add_argument("--device", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps; "
                                    "shorthand for --set train.device=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="look at a data source", description="Data tools.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("inspect", help="categories, counts per split, image sizes, task balance",
                            description="Describe a data source: categories, counts per split, image sizes, "
                                        "groups and the balance of each task.")
    q.add_argument("source", nargs="?", help="'synthetic', a Places-365 root, a class-per-folder tree or a "
                                             "CSV manifest (default: the config's data source)")
    q.add_argument("--task", dest="tasks", action="append", default=[],
                   help="a task to describe (repeatable; default: the config's private and desirable tasks)")
    _add_config_args(q)
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("verify", help="verify an encoder: fresh attackers trained to saturation",
                       description="Train fresh attackers from scratch on a fixed encoder's outputs until "
                                   "validation accuracy saturates, drop the LR 10x once, saturate again, and "
                                   "report validation and test accuracy (Sec. 4.1 of the paper).")
    p.add_argument("encoder", help="a training run folder or its encoder.pt, 'identity' (raw images) or 'blur' "
                                   "(Naive Blur)")
    p.add_argument("--task", dest="tasks", action="append", default=[],
                   help="a task to verify (repeatable; default: verify.tasks, else the run's private and desirable "
                        "tasks)")
    p.add_argument("--out", required=True,
                   help="output folder (verify.json, summary.md); one that already holds a verify.json is refused")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_args(p, default=None, default_help=RUN_CONFIG_HELP)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("grid", help="verify encoders x tasks (the shape of Table 2), resumable",
                       description="Verify every encoder on every task; finished cells are skipped on a rerun.")
    p.add_argument("--encoders", nargs="+", required=True, help="run folders or their encoder.pt, 'identity', 'blur'")
    p.add_argument("--tasks", nargs="+", default=[],
                   help="tasks (category names or attribute:<column>; default: verify.tasks)")
    p.add_argument("--out", required=True, help="grid folder")
    p.add_argument("--jobs", type=_positive, default=1, help="cells run in parallel processes (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    _add_config_args(p, default=None, default_help=RUN_CONFIG_HELP)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("report", help="tables and figures from run and grid folders",
                       description="Build Table 1, Table 2, the normalization ablation, Figure 1 and Figure 3 "
                                   "from run folders alone (report.md, report.json, a CSV per table, PNGs).")
    p.add_argument("inputs", nargs="+", help="training run, verify or grid folders (searched recursively)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic scenes",
                       description="Train a label-flip and a standard-GAN encoder, verify them and the Identity "
                                   "and Blur baselines on the private, desirable and one other task, and write "
                                   "the report. A rerun reuses finished steps, and refuses to reuse encoders "
                                   "trained with another config (use a new --out).")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--jobs", type=_positive, default=2,
                   help="processes in parallel: the two trainings, then verification cells (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)

    from privenc.deploy import add_deploy_commands

    add_deploy_commands(sub)

    p = sub.add_parser("config", help="print the resolved config as TOML, or list presets",
                       description="Print the resolved configuration (defaults < preset/file < --set).")
    _add_config_args(p)
    p.add_argument("--list", action="store_true", help="list the shipped presets")
    p.set_defaults(func=cmd_config)
    _accept_quiet_everywhere(sub)
    return parser


def _accept_quiet_everywhere(subparsers) -> None:
    """``-q`` also after the subcommand (``privenc verify -q ...``), where people put it."""
    for command in subparsers.choices.values():
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="only warnings and errors (no progress bars)")
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:  # privenc data [-q] inspect [-q]
            _accept_quiet_everywhere(nested[0])


def main(argv: list[str] | None = None) -> int:
    # Sleeping OpenMP threads (set before any import of torch: OpenMP reads it once) and a malloc
    # that keeps freed activations for reuse instead of faulting them in again every step
    # (privenc/runtime.py; docs/performance.md, "CPU threads" and "allocator").
    from privenc.runtime import tune_process

    tune_process()
    from privenc.checkpoint import CheckpointError
    from privenc.config import ConfigError
    from privenc.data.base import DataError
    from privenc.train import TrainingError
    from privenc.verify import VerificationError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True  # -q: warnings and errors only, no bars either
    if args.quiet or getattr(args, "no_progress", False):
        from privenc.runtime import disable_progress

        disable_progress()  # also the bars no argument reaches (the image cache), in workers too
    try:
        return int(args.func(args) or 0)
    # OSError: a missing file, a full disk, an unwritable folder (the writers name the file)
    except (ConfigError, DataError, CheckpointError, TrainingError, VerificationError, OSError) as err:
        print(f"privenc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privenc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
