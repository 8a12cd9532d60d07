"""The ``privenc`` command line: every subcommand and its options, registered in
:func:`build_parser`; what each one does is :mod:`privenc.commands`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from privenc import __version__
from privenc.commands import (
    cmd_audit,
    cmd_config,
    cmd_data_inspect,
    cmd_demo,
    cmd_encode,
    cmd_erase,
    cmd_export,
    cmd_grid,
    cmd_report,
    cmd_sweep,
    cmd_train,
    cmd_verify,
)

log = logging.getLogger("privenc")


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = "demo", default_help: str = "") -> None:
    parser.add_argument("--config", default=default, metavar="PRESET|FILE",
                        help=f"a preset name or a TOML file (default: {default_help or default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.iters=500 (repeatable)")


RUN_CONFIG_HELP = ("the config.toml of the first trained encoder's run (its [verify] settings and data), "
                   "else demo")


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
                                   "by the variance constraint or desirable tasks. Options against retrained "
                                   "attackers: --set train.private_ensemble=K (K private classifiers per private "
                                   "task, defeated together; default 1), train.adversary_reset_every=N (every N "
                                   "encoder steps one of them restarts from fresh weights; default 0 = never), "
                                   "train.classifier_steps=S (classifier updates per encoder update; default 1, "
                                   "the demo preset's 4). After the last step the encoder's normalization statistics "
                                   "are re-estimated on up to train.recalibrate_images training images (default "
                                   "4096; 0 keeps training's running averages) seen as verification sees them. "
                                   "train.kurtosis_limit=L (default 0, off) makes the encoder pay for output "
                                   "elements whose kurtosis over the batch exceeds L: unit variance held by a few "
                                   "images.")
    _add_config_args(p, default=None, default_help="demo; with --resume, the run's own config.toml")
    p.add_argument("--out", metavar="RUN", help="new run folder")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config changed by --set (the differences are listed; "
                        "the device, train.compile and verify.* settings may change without it)")
    p.add_argument("--device", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N, mps; "
                                    "shorthand for --set train.device=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="look at a data source", description="Data tools.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_sub.add_parser("inspect", help="categories, attributes, counts per split, image sizes, task balance",
                            description="Describe a data source: categories and their shares, counts per split, "
                                        "image sizes, groups, every attribute's values with counts and unknowns, "
                                        "and the balance of each task given with --task or named by --config.")
    q.add_argument("source", nargs="?", help="'synthetic', a Places-365 root, a class-per-folder tree or a "
                                             "CSV manifest (default: the config's data source)")
    q.add_argument("--task", dest="tasks", action="append", default=[],
                   help="a task to describe (repeatable; default: the private and desirable tasks of --config, "
                        "none without it)")
    _add_config_args(q, default=None, default_help="the defaults in code: the synthetic scenes, no task")
    q.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("erase", help="fit a LEACE linear eraser for one private task (a reference encoder)",
                       description="Fit LEACE (closed-form linear concept erasure, Belrose et al. 2023) on the "
                                   "training split for one private task: afterwards every class of the task has "
                                   "the same mean image, so no linear classifier beats chance on it. Written as a "
                                   "folder like a run (config.toml with the task as train.private, the split, "
                                   "encoder.pt) that verify, grid, audit and report take beside identity and blur. "
                                   "Images up to 64 px are erased at full resolution; larger ones "
                                   "are first downsampled (area average) to the learned encoder's output size, "
                                   "the size Naive Blur has.")
    p.add_argument("--task", help="the private task to erase (default: the config's train.private, when it names "
                                  "exactly one)")
    p.add_argument("--out", required=True, help="new or empty folder for the eraser")
    p.add_argument("--size", type=_positive, metavar="N",
                   # 64: privenc.leace.MAX_FULL_SIZE (not imported here: it would load torch for --help)
                   help="erase on the image downsampled (area average) to NxN (default: full size up to 64 px, "
                        "else the learned encoder's output size; at most 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("verify", help="verify an encoder: fresh attackers trained to saturation",
                       description="Train fresh attackers from scratch on a fixed encoder's outputs until "
                                   "validation accuracy saturates, drop the LR 10x once, saturate again, and "
                                   "report validation and test accuracy (Sec. 4.1 of the paper).")
    p.add_argument("encoder", help="a training run folder or its encoder.pt, a LEACE folder (privenc erase), a "
                                   ".safetensors, .torchscript.pt or .onnx export (on the --config data; .onnx "
                                   "runs in onnxruntime), 'identity' (raw images) or 'blur' (Naive Blur)")
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
    p.add_argument("--encoders", nargs="+", required=True,
                   help="run folders or their encoder.pt, LEACE folders (privenc erase), .safetensors, "
                        ".torchscript.pt or .onnx exports (on the --config data), 'identity', 'blur'")
    p.add_argument("--tasks", nargs="+", default=[],
                   help="tasks (category names or attribute:<column>; default: verify.tasks)")
    p.add_argument("--out", required=True, help="grid folder")
    p.add_argument("--jobs", type=_positive, default=1, help="cells run in parallel processes (default 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    _add_config_args(p, default=None, default_help=RUN_CONFIG_HELP)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser(
        "sweep", help="train a grid of configurations x seeds; the privacy-utility table and Pareto front",
        description="Train every combination of the --vary values x --seeds (resumable: finished runs are "
                    "skipped, unfinished ones resumed), verify each run and the references on the tasks (a "
                    "resumable grid in OUT/grid), audit the configurations on the front, and write OUT/sweep.json, "
                    "OUT/sweep.md and OUT/pareto.png. x = the private task's test balanced accuracy minus chance "
                    "1/K, y = the desirable task's test balanced accuracy minus Identity's, both in points, from "
                    "the strongest verification attacker; each configuration is the mean over seeds (error bars: "
                    "min-max); the front joins the configuration means that no other mean beats on both axes "
                    "(lower x, higher y). Under torchrun (torchrun --nproc_per_node N -m privenc sweep ...) every "
                    "rank takes part in every training, data-parallel as privenc train (train.batch_size is the "
                    "global batch, divisible by N), one run after another; each rank then verifies its share of "
                    "the grid's cells and waits for the others; rank 0 alone writes the run folders and results "
                    "and audits the front.")
    p.add_argument("--vary", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="values to sweep (repeatable; each value parsed like --set, commas inside [...] kept), "
                        "e.g. --vary train.alpha=0.1,0.5,1 --vary train.encoder_loss=label_flip,standard_gan; not "
                        "data.*, verify.*, train.private, train.desirable or train.seed")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="training seeds (train.seed: initial weights and batch order; data.seed, the split, stays "
                        "fixed), e.g. 0,1,2 (default: the config's train.seed)")
    p.add_argument("--out", required=True, help="sweep folder (a rerun into it reuses what is finished)")
    p.add_argument("--tasks", nargs="+", default=[],
                   help="tasks to verify (the private and desirable tasks are always verified; default: also "
                        "verify.tasks)")
    p.add_argument("--references", default="identity,blur", metavar="ENC1,ENC2,...",
                   help="reference encoders verified beside the runs, as privenc grid takes them: identity (needed: "
                        "y is measured against it), blur, or a run folder / encoder.pt, e.g. a linear eraser "
                        "(default: identity,blur)")
    audit_flags = p.add_mutually_exclusive_group()
    audit_flags.add_argument("--audit-front", dest="audit", action="store_true", default=True,
                             help="audit each configuration on the front (its least private seed; the default)")
    audit_flags.add_argument("--no-audit", dest="audit", action="store_false", help="skip the audit")
    p.add_argument("--audit-rounds", type=_positive, default=2,
                   help="the audit's --max-rounds, round 0 included (default 2)")
    p.add_argument("--jobs", type=_positive, default=1,
                   help="processes in parallel: trainings, then verification cells, then audit attackers (default "
                        "1); under torchrun the trainings use the ranks instead, and --jobs applies to each rank's "
                        "cells and the audit")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("audit", help="the worst case over the attacker zoo, searched until it stops rising",
                       description="Search for the strongest attacker of a fixed encoder: round 0 is plain "
                                   "verification with the encoder's [verify] settings; each next round trains the "
                                   "whole zoo (paper, wide, mlp, linear) with 2x the patience and iterations, 2x "
                                   "the views (up to 8), one more seed per round and more learning rates "
                                   "(1e-3, 1e-4, then "
                                   "1e-5), until a round raises the best validation balanced accuracy by less "
                                   "than --margin (see --stop-rule), or the budget runs out (then the verdict "
                                   "says 'not converged'). The attacker chosen on validation is "
                                   "reported on test: balanced accuracy (mean per-class recall) with a "
                                   "bootstrap 95% interval, accuracy, the majority rate and bits. Resumable: "
                                   "finished attackers are kept in OUT/trials and a rerun (also with a larger "
                                   "budget) reuses them. Exit status 1 when --fail-above is exceeded, 2 on an error.")
    p.add_argument("encoder", help="a training run folder or its encoder.pt (every attack), a LEACE folder "
                                   "(privenc erase; all but adaptive), a .safetensors, .torchscript.pt or .onnx "
                                   "export with --config for its data (all but adaptive), "
                                   "'identity' or 'blur'")
    p.add_argument("--task", dest="tasks", action="append", default=[],
                   help="a task to audit (repeatable; default: verify.tasks, else the run's private and desirable "
                        "tasks)")
    p.add_argument("--all-attributes", action="store_true",
                   help="also audit every attribute of the encoder's data source as a task (attribute:<column> "
                        "of a CSV source; not the category, not data.group_by): leakage of attributes never "
                        "trained against, role 'other'")
    p.add_argument("--out", required=True, help="audit folder (audit.json, audit.md, trials/); a rerun continues it")
    p.add_argument("--margin", type=float, default=1.0, metavar="POINTS",
                   help="converged when a round raises the best validation balanced accuracy by less than this "
                        "many points, measured as --stop-rule says (default 1.0)")
    p.add_argument("--stop-rule", choices=["validation", "confirmed"], default="validation",
                   help="what a round's rise is measured on: 'validation' (default), the best validation score "
                        "over all attackers, which also rises by chance as rounds add attackers to choose from; "
                        "'confirmed', the attacker best on one half of validation scored on the other, both "
                        "ways: free of that lift but noisier, so it stops early more often (docs/results.md)")
    p.add_argument("--max-rounds", type=_positive, default=3,
                   help="at most this many rounds, round 0 included (default 3)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="MIN",
                   help="start no new round after this many minutes of this call (default: no limit)")
    p.add_argument("--jobs", type=_positive, default=1,
                   help="parallel processes (default 1): the attackers of a round, and each task's extra attacks "
                        "once its search has stopped, beside each other and the next task's search")
    p.add_argument("--attacks", metavar="LIST",
                   help="comma-separated attacks to run (default: all that apply): zoo (the search beyond round 0; "
                        "round 0, plain verify, always runs), adaptive (fine-tuned from the adversarial classifier "
                        "the encoder was trained against: a run folder with its checkpoint, on its private tasks), "
                        "multiscale (trained on encodings of views at scales 0.75, 1, 1.25; every encoder), "
                        "reconstruction (a decoder inverting the encoding: PSNR, SSIM, and a raw-image attacker on "
                        "its reconstructions; every encoder). Those that do not apply are listed in the verdict "
                        "with the reason")
    p.add_argument("--identity", metavar="compute|FOLDER",
                   help="quote Identity (raw images) beside the worst case: 'compute' verifies it with the same "
                        "data and [verify] settings into OUT/identity, or give a verify or grid folder holding it")
    p.add_argument("--fail-above", type=float, metavar="X",
                   help="exit with status 1 when a task's worst case is more than X points of balanced accuracy "
                        "above its chance level 1/K (K classes; on balanced tasks 1/K is the majority rate)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_args(p, default=None, default_help=RUN_CONFIG_HELP)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("report", help="tables and figures from run, grid and sweep folders",
                       description="Build Table 1, Table 2, the normalization ablation, Figure 1 and Figure 3 "
                                   "from run folders alone (report.md, report.json, a CSV per table, PNGs); for a "
                                   "sweep folder (sweep.json) also its table and privacy-utility front, redrawn. "
                                   "Runs that differ only in train.seed are one configuration: with several seeds "
                                   "the tables show the mean ± sd over seeds and a per-seed table "
                                   "(report_seeds.csv) every seed's number with its interval. An audit folder "
                                   "(audit.json) puts the audit's worst case in its run's private-task cells, "
                                   "marked †; report.json keeps plain verification's number beside it.")
    p.add_argument("inputs", nargs="+",
                   help="training run, verify, grid, sweep or audit folders (searched recursively)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic scenes",
                       description="Train a label-flip and a standard-GAN encoder, verify them and the Identity "
                                   "and Blur baselines on the private and the desirable task (and --other-task), "
                                   "and write the report. A rerun reuses finished steps, and refuses to reuse "
                                   "encoders trained with another config (use a new --out).")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--other-task", metavar="TASK",
                   help="also verify every encoder on this task, which none was trained for (e.g. g1c2): "
                        "leakage of an attribute nobody trained against; about 4 more minutes on 2 cores")
    p.add_argument("--jobs", type=_positive, default=2,
                   help="processes in parallel: the two trainings, then verification cells (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)

    from privenc.deploy import FORMATS

    source_help = ("a training run folder (encoder.pt + config.toml), an encoder.pt inside one, or an "
                   "exported .safetensors")
    p = sub.add_parser(
        "encode", help="encode a folder or CSV list of images into sharded .npy files (resumable)",
        description="Encode every image with a trained encoder (evaluation transform: resize to the "
                    "run's data.load_size, center crop to data.image_size, values in [-1, 1]) into "
                    "OUT/shard-NNNNN.npy (float32 [n, C, H, W]) plus OUT/manifest.jsonl mapping each "
                    "source path to (shard, row); unreadable images are listed there with status "
                    "'error'. A rerun skips finished shards; a rerun with another encoder or other "
                    "input/shard size into the same OUT is refused (OUT/encode.json records them).")
    p.add_argument("--encoder", required=True, metavar="RUN", help=source_help)
    p.add_argument("--input", required=True, metavar="DIR|CSV",
                   help="a folder (every image below it, recursively, sorted by path) or a CSV file "
                        "whose 'path' column lists images relative to the CSV")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (new, empty, or a previous "
                                                                   "encode of the same input to resume)")
    p.add_argument("--shard-size", type=int, default=1024, metavar="N", help="inputs per shard (default 1024)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--previews", type=int, default=0, metavar="N",
                   help="write PNGs of the first N encodings, histogram-equalized per location and "
                        "channel over the first shard, to OUT/previews/ (default 0)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes decoding images (default 0: decode in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser(
        "export", help="export a trained encoder to ONNX, TorchScript or safetensors",
        description="Write a standalone encoder (eval mode: a fixed per-image function) and, beside "
                    "it, PATH.json: the input contract (size, RGB, [-1, 1] = (x/255-0.5)/0.5, "
                    "resize/crop rule), output shape, encoder config, privenc version and the "
                    "source file's sha256. The export is checked against the PyTorch encoder "
                    "(batch sizes 1 and 5, max abs diff <= 1e-4) before it is written.")
    p.add_argument("--encoder", required=True, metavar="RUN", help=source_help)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (dynamic batch axis, opset 17), torchscript (traced) or safetensors "
                        "(state dict + contract; rebuild with privenc.deploy.load_safetensors)")
    p.add_argument("--out", metavar="PATH", help="output file (default: beside the encoder file, "
                                                 "encoder.onnx / encoder.torchscript.pt / encoder.safetensors)")
    p.set_defaults(func=cmd_export)

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
    from privenc.errors import PrivencError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True  # -q: warnings and errors only, no bars either
    if args.quiet or getattr(args, "no_progress", False):
        from privenc.runtime import disable_progress

        disable_progress()  # also the bars no argument reaches (the image cache), in workers too
    try:
        with _sigterm_as_exit():
            return int(args.func(args) or 0)
    # OSError: a missing file, a full disk, an unwritable folder (the writers name the file)
    except (PrivencError, OSError) as err:
        print(f"privenc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privenc: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("privenc: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM


class _Terminated(BaseException):
    """SIGTERM, raised where the command is, so that it unwinds as Ctrl-C does: worker pools
    terminate their workers (privenc/pools.py) and no file is left half written."""


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    # Only the main thread may set handlers (main() may be called from elsewhere, as in tests),
    # and the caller's own handler comes back afterwards. Not under torchrun: its agent stops
    # the ranks, and a Python handler would wait for a rank blocked in a collective (a sweep's
    # ranks wait hours for each other) where the default action ends it at once; a rank's own
    # workers still exit with it. (LOCAL_RANK: distributed.under_torchrun's test, read here
    # without importing torch, which the quick commands never load.)
    if threading.current_thread() is not threading.main_thread() or "LOCAL_RANK" in os.environ:
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
