"""The encoders that verification, the grid and the audit take: a trained run (its folder or its
encoder.pt), a baseline of the paper (Identity: raw images; Naive Blur) or a LEACE eraser's
folder (:mod:`privenc.leace`, kept like a run), each with the data config it is verified on;
frozen while attackers train on it, and checked afterwards.
"""


from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from privenc import leace, runs
from privenc.config import Config, DataConfig, config_diff, demo_config, load_config
from privenc.data import open_source, parse_task
from privenc.data.tasks import attribute_tasks
from privenc.errors import CheckpointError, ConfigError
from privenc.models import build_encoder

log = logging.getLogger(__name__)

BASELINES = ("identity", "blur")


# --------------------------------------------------------------------------- encoders


@dataclass
class LoadedEncoder:
    name: str
    kind: str               # learned | identity | blur | leace
    module: nn.Module
    config: Config          # the config that defines its data (a run's own, for learned encoders)
    run_dir: Path | None    # training run folder (its splits are reused)
    exported: str | None = None  # the format of an exported file (``privenc export``): onnx | torchscript | safetensors
    label: str | None = None  # how tables name an encoder that has no training run (LEACE)


EXPORTED = {".safetensors": "safetensors", ".torchscript.pt": "torchscript", ".onnx": "onnx"}
"""The exported files verification loads (name suffix -> format); an ONNX file runs in
onnxruntime (:class:`privenc.deploy.onnx_encoder.OnnxEncoder`)."""


def exported_format(path: Path) -> str | None:
    """The format of an exported encoder file that verification can load, by its name."""
    return next((fmt for suffix, fmt in EXPORTED.items() if Path(path).name.endswith(suffix)), None)


def attacker_lr(encoder: LoadedEncoder, family: str = "") -> float:
    """The attackers' Adam LR: ``verify.lr_raw`` on raw images, ``verify.lr`` on encodings, and
    for the ``adaptive`` family ``verify.lr_adaptive`` where set (it only applies to encodings).
    A LEACE eraser's output is the image (or its Blur-sized downsample) minus a rank-(K-1)
    correction, with the pixels' scale and statistics: its attackers get the rate of the
    baseline it modifies, Identity's at full resolution and Blur's (``verify.lr``) when
    downsampled."""
    settings = encoder.config.verify
    raw = encoder.kind == "identity" or (encoder.kind == "leace"
                                         and encoder.module.size == encoder.module.image_size)
    return settings.family_lr(family, settings.lr_raw if raw else settings.lr)


def learned_encoder_path(spec: str) -> Path:
    """The path of a learned encoder given to ``verify``, ``grid`` or ``audit`` (a training run
    folder, its ``encoder.pt``, an encoder file, or a ``.safetensors`` / ``.torchscript.pt`` /
    ``.onnx`` export); anything else is a ConfigError that says what was expected."""
    path = Path(spec)
    expected = ("give a training run folder, its encoder.pt, a .safetensors, .torchscript.pt or .onnx export, a "
                "LEACE folder (privenc erase), 'identity' or 'blur'")
    if not path.exists():
        raise ConfigError(f"encoder {spec!r}: no such run folder or file; {expected}")
    if path.is_dir() and not runs.is_finished(path):
        what = "an unfinished training run" if runs.is_run(path) else "not a training run folder"
        raise ConfigError(f"encoder {spec!r} is {what} (no {runs.ENCODER_FILE} inside); {expected}")
    if path.is_file() and path.suffix == ".json":
        raise ConfigError(f"encoder {spec!r} is an export's input contract, not an encoder: give the exported file "
                          f"beside it; {expected}")
    return path


def run_folder_of(spec: str) -> Path | None:
    """The training run folder of a learned encoder given as that folder or as its encoder.pt:
    the folder holding its config.toml. None for a baseline, any other file (an encoder file
    alone, or copied into another run's folder under another name), or a path that is not there
    (:func:`learned_encoder_path` says what is wrong with it)."""
    if spec in BASELINES:
        return None
    path = Path(spec).resolve()
    folder = path if path.is_dir() else path.parent if path.name == runs.ENCODER_FILE and path.is_file() else None
    return folder if folder is not None and runs.is_run(folder) else None


def encoder_name(spec: str) -> str:
    """How results name an encoder: a baseline's name, its run folder's name (also when given
    as the run's encoder.pt), else the file name."""
    if spec in BASELINES:
        return spec
    folder = run_folder_of(spec)
    return folder.name if folder is not None else Path(spec).resolve().name


def check_tasks(data: DataConfig, tasks: list[str]) -> None:
    """Parse every task against the data it will be verified on: errors name the task."""
    source = open_source(data)
    for task in tasks:
        parse_task(task, source)


def load_encoder_spec(spec: str, config: Config, device: torch.device) -> LoadedEncoder:
    """``identity``, ``blur``, a training run folder or its encoder.pt, a LEACE folder (or its
    encoder.pt), an encoder file, or an exported ``.safetensors`` / ``.torchscript.pt`` / ``.onnx``. An encoder
    in a folder brings its own data config (input size, split) and reuses the folder's splits;
    an encoder file alone is verified on ``config``'s data, which must have its input size, and
    an exported file likewise (also its load size, as its input contract says). Verification
    settings are always ``config``'s."""
    if spec in BASELINES:
        module = build_encoder(spec, config.encoder, config.data.image_size)
        return LoadedEncoder(spec, spec, module.to(device).eval(), config, None)
    path = learned_encoder_path(spec)
    if exported_format(path) is not None:
        return _load_exported(spec, path, config, device)
    file = path / runs.ENCODER_FILE if path.is_dir() else path
    kind = "leace" if runs.encoder_kind(file) == leace.KIND else "learned"
    module = leace.read_eraser(file, device) if kind == "leace" else runs.load_encoder(file, device)
    run_dir = run_folder_of(spec)
    run_config = runs.read_config(run_dir) if run_dir is not None else copy.deepcopy(config)
    run_config.verify = config.verify
    if module.image_size != run_config.data.image_size:
        where = (f"its run's config ({run_dir / runs.CONFIG_FILE}) says {run_config.data.image_size}" if run_dir
                 else f"the data config gives {run_config.data.image_size} (data.image_size; an encoder file "
                      f"alone is verified on the --config data: give its run folder, or set data.image_size)")
        raise ConfigError(f"encoder {spec!r} takes {module.image_size}x{module.image_size} images, but {where}")
    if kind == "leace":  # the erased task is private also where the file is given alone
        run_config.train.private = [module.task]
        run_config.train.desirable = [t for t in run_config.train.desirable if t != module.task]
    label = leace.label(module.task) if kind == "leace" else None
    return LoadedEncoder(encoder_name(spec), kind, module, run_config, run_dir, label=label)


def _load_exported(spec: str, path: Path, config: Config, device: torch.device) -> LoadedEncoder:
    """An exported encoder, verified on ``config``'s data, which must follow its input contract
    (image_size and load_size): the contract says how the deployed encoder's images are made.
    A safetensors file holds its contract; TorchScript and ONNX files have theirs beside them."""
    from privenc.deploy import contract_path, load_onnx, load_safetensors

    fmt = exported_format(path)
    if fmt == "safetensors":
        module, contract = load_safetensors(path, device)  # the contract is in its metadata
    else:
        try:
            contract = json.loads(contract_path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: its input contract {contract_path(path)} is missing or unreadable "
                                  f"({type(err).__name__}: {err}); export it again with privenc export") from None
        if fmt == "onnx":
            module = load_onnx(path, contract)  # runs on the CPU and hands back encodings on the input's device
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; still portable
                    module = torch.jit.load(str(path), map_location=device).eval()
            except (RuntimeError, ValueError, OSError) as err:
                raise CheckpointError(f"{path}: not a loadable TorchScript file (truncated or corrupt?): "
                                      f"{err}") from None
    try:
        sizes = {key: int(contract["input"][key]) for key in ("image_size", "load_size")}
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its input contract lacks a usable input size ({type(err).__name__}: {err}); "
                              f"export it again with privenc export") from None
    run_config = copy.deepcopy(config)
    for key, wanted in sizes.items():
        given = getattr(run_config.data, key)
        if wanted != given:
            raise ConfigError(f"encoder {spec!r} was exported for data.{key} = {wanted} (its input contract), but "
                              f"the data config gives {given}: an exported file is verified on the --config data; "
                              f"--set data.{key}={wanted}")
    return LoadedEncoder(encoder_name(spec), "learned", module, run_config, None, exported=fmt)


def freeze(module: nn.Module) -> dict[str, torch.Tensor]:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, snapshot: dict[str, torch.Tensor], name: str) -> None:
    """The probe pattern's last check: verification must not have moved the fixed encoder."""
    for key, value in module.state_dict().items():
        if not torch.equal(value, snapshot[key]):
            raise AssertionError(f"encoder {name} changed during verification ({key})")


# --------------------------------------------------------------------------- encode once


# --------------------------------------------------------------------------- which config verifies them


def verification_config(encoders: list[str], config: str | None, overrides: list[str]) -> Config:
    """``config`` (a preset or file), else the config of the first trained encoder's run: its
    [verify] settings (a paper-preset run is verified by the paper's protocol) and its data (the
    baselines of a grid see the same images), else the demo preset. ``overrides`` apply on top; a
    trained encoder brings its own data, encoder and classifier config, so the overrides outside
    verify.* that it replaces are named in a warning (in a grid they still reach the baselines)."""
    run_dirs = [folder for folder in map(run_folder_of, encoders) if folder is not None]
    verify_sets = [item for item in overrides if item.strip().startswith("verify.")]
    ignored = [item for item in overrides if item not in verify_sets]
    if run_dirs and ignored:
        baselines = [e for e in encoders if e in BASELINES]
        log.warning("ignored for the trained encoders (and LEACE erasers), which bring their own data, encoder and "
                    "classifier config "
                    "(%s): %s; only verify.* settings apply to them%s",
                    ", ".join(str(run / runs.CONFIG_FILE) for run in run_dirs), ", ".join(ignored),
                    f" (the baselines {', '.join(baselines)} do use them, so they may see other data)"
                    if baselines else "")
    if config is not None:
        return load_config(config, overrides)
    if not run_dirs:
        return demo_config(overrides)
    source = str(run_dirs[0] / runs.CONFIG_FILE)
    chosen = load_config(source, overrides)
    log.info("verification settings from %s (no --config given)", source)
    for other in run_dirs[1:]:
        theirs = runs.read_config(other, verify_sets)
        diff = config_diff({"verify": theirs.to_dict()["verify"]}, {"verify": chosen.to_dict()["verify"]})
        if diff:
            log.warning("%s was trained with other verification settings; all cells use those of %s: %s",
                        other, source, "; ".join(diff))
    return chosen


def all_attribute_tasks(encoder: str, config: Config) -> list[str]:
    """Every attribute of the data an encoder is verified on, as a task (a run's own data, else
    the config's): see :func:`privenc.data.tasks.attribute_tasks` for what is left out."""
    run = run_folder_of(encoder)
    data = runs.read_config(run).data if run is not None else config.data
    specs = attribute_tasks(open_source(data), data.group_by)
    if not specs:
        raise ConfigError(f"--all-attributes: the {data.source} source has no attribute to audit besides its "
                          f"categories; a CSV source's columns are its attributes (give tasks with --task)")
    return specs


def default_tasks(encoder: str, config: Config) -> list[str]:
    """A run's own private and desirable tasks (a LEACE folder's: the erased task and the
    desirable ones of the config it was fitted with); for a baseline or an encoder file alone,
    the config's."""
    run = run_folder_of(encoder)
    source = runs.read_config(run) if run is not None else config
    return [*source.train.private, *source.train.desirable]
