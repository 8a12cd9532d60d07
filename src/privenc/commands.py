"""What each ``privenc`` subcommand does: it builds a config from its arguments and calls the
library (the parser that registers them is :func:`privenc.cli.build_parser`). Heavy modules are
imported inside each command, after the command line has tuned the process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("privenc")


def _config_from_args(args: argparse.Namespace):
    from privenc.config import load_config

    return load_config(args.config, args.overrides)


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
    # Only tasks someone chose: --task, else a given config's own (the code defaults name none).
    tasks = args.tasks or list(dict.fromkeys([*config.train.private, *config.train.desirable]))
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
        from privenc.errors import DataError

        raise DataError(f"source {source!r} is not 'synthetic', a CSV file or an existing folder")
    validate(config)
    return config


def cmd_train(args: argparse.Namespace) -> int:
    from privenc import distributed, runs
    from privenc.config import demo_config
    from privenc.errors import ConfigError
    from privenc.training import train

    if args.device:
        args.overrides.append(f"train.device={args.device}")
    if args.resume and (args.out or args.config):
        given = "--out" if args.out else "--config"
        raise ConfigError(f"--resume continues {args.resume} in place with its own config.toml; drop {given} "
                          f"(change values with --set and --allow-config-change)")
    if args.allow_config_change and not args.resume:
        raise ConfigError("--allow-config-change only applies with --resume")
    world = distributed.launched()
    if args.resume:
        run_dir = Path(args.resume)
        config = runs.resume_config(run_dir, args.overrides, args.allow_config_change)
        path = train(config, run_dir, resume=True, progress=not args.no_progress)
    else:
        if not args.out:
            raise ConfigError("privenc train needs --out RUN (a new run folder) or --resume RUN")
        run_dir = Path(args.out)
        runs.check_new_run_folder(run_dir, world.rank)
        config = _config_from_args(args) if args.config else demo_config(args.overrides)
        path = train(config, run_dir, progress=not args.no_progress)
    if world.is_main:
        print(f"encoder: {path}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from privenc.errors import ConfigError
    from privenc.leace import erase

    config = _config_from_args(args)
    task = args.task
    if task is None:
        if len(config.train.private) != 1:
            raise ConfigError(f"erase: give --task (the config's train.private names {len(config.train.private)} "
                              f"tasks: {', '.join(config.train.private) or 'none'})")
        task = config.train.private[0]
    path = erase(config, task, Path(args.out), size=args.size, device=args.device, progress=not args.no_progress)
    print(f"eraser: {path}")
    return 0


def _verification_config(args: argparse.Namespace, encoders: list[str]):
    from privenc.encoders import verification_config

    return verification_config(encoders, args.config, args.overrides)


def cmd_verify(args: argparse.Namespace) -> int:
    from privenc.encoders import default_tasks
    from privenc.verification import verify

    config = _verification_config(args, [args.encoder])
    tasks = args.tasks or config.verify.tasks or default_tasks(args.encoder, config)
    if not tasks:  # a baseline under a config that names no task (the defaults name none)
        from privenc.config import ConfigError

        raise ConfigError(f"verify {args.encoder}: no task; give --task, or a --config whose verify.tasks or "
                          f"train.private names some")
    verify(args.encoder, config, tasks, Path(args.out), device=args.device, progress=not args.no_progress)
    print((Path(args.out) / "summary.md").read_text(), end="")
    print(f"results: {Path(args.out) / 'verify.json'}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from privenc.errors import ConfigError
    from privenc.grid import run_grid
    from privenc.verification import summarize

    config = _verification_config(args, args.encoders)
    tasks = args.tasks or config.verify.tasks
    if not tasks:
        raise ConfigError("grid: no tasks; give --tasks or set verify.tasks")
    records = run_grid(args.encoders, tasks, config, Path(args.out), jobs=args.jobs, device=args.device)
    print(summarize(records), end="")
    print(f"cells: {Path(args.out) / 'cells'}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from privenc.attacks import parse_attacks
    from privenc.audit import audit
    from privenc.encoders import all_attribute_tasks, default_tasks

    attacks = parse_attacks(args.attacks)  # a typo fails before the config is read
    config = _verification_config(args, [args.encoder])
    tasks = args.tasks or config.verify.tasks or default_tasks(args.encoder, config)
    if args.all_attributes:
        tasks = list(dict.fromkeys([*tasks, *all_attribute_tasks(args.encoder, config)]))
    result = audit(args.encoder, config, tasks, Path(args.out), margin=args.margin, max_rounds=args.max_rounds,
                   max_minutes=args.max_minutes, jobs=args.jobs, identity=args.identity, fail_above=args.fail_above,
                   device=args.device, progress=not args.no_progress, attacks=attacks, stop_rule=args.stop_rule)
    print((Path(args.out) / "audit.md").read_text(), end="")
    print(f"results: {Path(args.out) / 'audit.json'}")
    if result["failed"]:
        print(f"privenc: audit: worst case above --fail-above {args.fail_above:g} points for "
              f"{', '.join(result['failed'])}", file=sys.stderr)
        return 1  # the CI gate; errors exit 2
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import shlex

    from privenc.sweep import parse_seeds, run_sweep

    references = [r.strip() for r in args.references.split(",") if r.strip()]
    # The command as it could be typed again: sweep.json, sweep.md and the figure name it.
    words = ["privenc", "sweep", "--config", args.config, *(w for v in args.vary for w in ("--vary", v)),
             *(["--seeds", args.seeds] if args.seeds else []), *(w for s in args.overrides for w in ("--set", s)),
             *(["--tasks", *args.tasks] if args.tasks else []), "--references", ",".join(references),
             *([] if args.audit else ["--no-audit"]), "--out", args.out]
    result = run_sweep(args.config, args.overrides, args.vary, parse_seeds(args.seeds), Path(args.out),
                       tasks=args.tasks, references=references, jobs=args.jobs, audit_front=args.audit,
                       audit_rounds=args.audit_rounds, device=args.device, progress=not args.no_progress,
                       command=shlex.join(words))
    if result is not None:  # rank 0 under torchrun
        print((Path(args.out) / "sweep.md").read_text(), end="")
        print(f"figure: {Path(args.out) / 'pareto.png'}")
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
    report = run_demo(Path(args.out), _config_from_args(args), other_task=args.other_task, jobs=args.jobs,
                      progress=not args.no_progress)
    text = report.read_text()
    table2 = text[text.index("## Table 2"):].split("\n## ")[0] if "## Table 2" in text else text
    print(table2)
    print(f"demo finished in {(time.time() - started) / 60:.1f} min; report: {report}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from privenc.deploy import encode

    summary = encode(args.encoder, args.input, args.output, shard_size=args.shard_size,
                     batch_size=args.batch_size, device=args.device, previews=args.previews,
                     progress=not args.no_progress, num_workers=args.workers)
    print(f"encoded {summary['encoded']} of {summary['images']} images into {summary['shards']} shard(s) "
          f"({summary['shards_reused']} reused), {summary['errors']} error(s); manifest: {summary['manifest']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from privenc.deploy import contract_path, export
    from privenc.errors import ExportError

    try:
        path = export(args.encoder, args.format, args.out)
    except ExportError as err:
        print(f"privenc: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path}; input contract: {contract_path(path)}")
    return 0
