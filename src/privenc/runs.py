"""The training run folder: what it holds, and the one place that reads and writes it.

    config.toml, meta.json       the resolved config and provenance (privenc, Python, torch, git)
    splits/, tasks.json          the data split and tasks (written by the data layer)
    metrics.jsonl                one JSON object per logged step
    checkpoints/last.pt          the latest full training state (resume from it)
    encoder.pt                   the final encoder with its metadata (verify, encode, export)

Every other module asks this one for file names, for the encoder, the metrics and the config of
a run, and for whether a config may differ from the one a run was made with (:data:`IGNORED`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privenc import checkpoint as ckpt
from privenc.atomic import atomic_write_text
from privenc.config import Config, EncoderConfig, build_section, config_diff, load_config
from privenc.errors import CheckpointError, ConfigError, TrainingError
from privenc.models import Encoder

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoints/last.pt"
ENCODER_FILE = "encoder.pt"


# --------------------------------------------------------------------------- what a folder is


def is_run(folder: Path) -> bool:
    """A training run folder: it has its config.toml (written before any training step)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / CHECKPOINT_FILE).is_file()


def is_finished(folder: Path) -> bool:
    return (Path(folder) / ENCODER_FILE).is_file()


def refuse_run_folder(folder: Path, command: str) -> None:
    """Results of ``command`` (verify, grid, report) written into a training run folder would be
    read back as part of that run; refuse such an output folder with a clear message."""
    folder = Path(folder)
    if is_run(folder) and (folder / "checkpoints").is_dir():
        raise ConfigError(f"{folder} is a training run folder; give {command} an output folder of its own (--out)")


def role_label(private: list[str], desirable: list[str]) -> str:
    """A run named by its tasks as the paper's tables do: '-army_base +airport_terminal' inhibits
    army_base and keeps airport_terminal."""
    return " ".join([*(f"-{t}" for t in private), *(f"+{t}" for t in desirable)])


def read_config(folder: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(str(Path(folder) / CONFIG_FILE), overrides)


# --------------------------------------------------------------------------- config and provenance


def git_revision() -> str | None:
    """The git revision of the privenc source tree, when it is a checkout; None otherwise."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    rev = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5)
    return rev + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def write_config(config: Config, folder: Path) -> None:
    """Record the resolved config (config.toml) and provenance (meta.json) in a run folder
    (atomically: a crash mid-write must not leave a half config that a resume would read)."""
    from privenc import __version__

    folder = Path(folder)
    atomic_write_text(folder / CONFIG_FILE, config.to_toml())
    meta = {"privenc": __version__, "git_revision": git_revision(), "python": sys.version.split()[0],
            "torch": torch.__version__}
    atomic_write_text(folder / META_FILE, json.dumps(meta, indent=2) + "\n")


# --------------------------------------------------------------------------- config changes

# Keys that may differ between a run's config and the one a later command brings, by purpose.
# Where a run executes does not change what it computes, nor do verification settings.
WHERE_IT_RUNS = ("train.device", "data.num_workers")
IGNORED: dict[str, tuple[str, ...]] = {
    # --resume: the device and whether the encoder is compiled (the same function) may change;
    # verify.* changes are accepted and recorded
    "resume": ("train.device", "train.compile", "verify.*"),
    # reusing a finished training (demo): nothing that shaped the weights may differ
    "reuse": (*WHERE_IT_RUNS, "verify.*"),
    # adding cells to a grid: verify.tasks only chooses the tasks when --tasks is not given
    "grid": ("verify.tasks",),
}


def config_changes(old: dict[str, Any], new: dict[str, Any], purpose: str,
                   also_ignore: tuple[str, ...] = ()) -> list[str]:
    """``section.key: old -> new`` lines for what ``new`` changes in ``old`` that ``purpose``
    (a key of :data:`IGNORED`) does not allow; ``section.*`` ignores a whole section.
    ``also_ignore``: more ``section.key`` names the caller allows to differ."""
    ignored = (*IGNORED[purpose], *also_ignore)
    sections = {item[:-2] for item in ignored if item.endswith(".*")}
    keys = tuple(item for item in ignored if not item.endswith(".*"))
    trimmed = {section: values for section, values in new.items() if section not in sections}
    return config_diff(old, trimmed, ignore=keys)


# --------------------------------------------------------------------------- the encoder file


@dataclass
class EncoderFile:
    """A trained encoder with what its file says about it."""
    module: Encoder
    path: Path
    step: int | None
    encoder_config: dict[str, Any]
    image_size: int


def save_encoder(path: Path, config: Config, encoder: nn.Module, step: int,
                 calibration: dict[str, float] | None = None) -> None:
    """The encoder alone, with what is needed to rebuild it (its config and input size), and
    what the final re-estimate of its normalization statistics measured (``calibration``)."""
    ckpt.save(path, {
        "kind": "learned",
        "step": step,
        **({"calibration": calibration} if calibration is not None else {}),
        "encoder_config": config.to_dict()["encoder"],
        "image_size": config.data.image_size,
        "output_shape": list(encoder.output_shape),
        # Standard (contiguous) layout whatever train.channels_last was: the file is what
        # encode / export / other tools load.
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
    })


def read_encoder(run_or_file: Path, device: str | torch.device = "cpu") -> EncoderFile:
    """Load a trained encoder (strictly, in eval mode) from a run folder or an encoder file,
    with its metadata. Every way a file can be wrong becomes a CheckpointError that names it."""
    path = Path(run_or_file)
    if path.is_dir():
        path = path / ENCODER_FILE
    payload = ckpt.load(path, map_location=device)
    if payload.get("kind") == "leace":
        raise CheckpointError(f"{path}: a LEACE eraser (privenc erase), not a trained encoder; verify, grid, audit "
                              f"and report take its folder, encode and export only trained encoders")
    if payload.get("kind") != "learned":
        raise CheckpointError(f"{path}: not an encoder file (kind={payload.get('kind')!r})")
    try:
        encoder_cfg = build_section("encoder", EncoderConfig, payload["encoder_config"])
        encoder = Encoder(encoder_cfg, int(payload["image_size"]))
    except KeyError as err:
        raise CheckpointError(f"{path}: encoder file without {err}") from None
    except (ConfigError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: the encoder it describes cannot be built: {err}") from None
    ckpt.load_state(encoder, payload["state_dict"], f"{path}: encoder")
    bad = [key for key, value in payload["state_dict"].items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(f"{path}: the encoder holds non-finite values (NaN or Inf) in "
                              f"{', '.join(bad[:5])}; its encodings would be meaningless")
    step = payload.get("step")
    return EncoderFile(encoder.to(device).eval(), path, int(step) if step is not None else None,
                       dict(payload["encoder_config"]), int(payload["image_size"]))


def encoder_kind(path: Path) -> str | None:
    """What an encoder file holds: ``"learned"`` (a trained encoder), ``"leace"`` (an eraser of
    :mod:`privenc.leace`); a file that is no privenc checkpoint is a CheckpointError."""
    kind = ckpt.load(path).get("kind")
    return kind if isinstance(kind, str) else None


def load_encoder(run_or_file: Path, device: str | torch.device = "cpu") -> Encoder:
    """The encoder of :func:`read_encoder`, without its metadata."""
    return read_encoder(run_or_file, device).module


def encoder_written_at(path: Path, step: int) -> bool:
    """Whether ``path`` is a readable final encoder of ``step`` (a run killed after its last
    checkpoint but before its encoder file was written still has to write it)."""
    try:
        return Path(path).is_file() and int(ckpt.load(path).get("step", -1)) == step
    except CheckpointError:
        return False


# --------------------------------------------------------------------------- metrics


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    try:
        with Path(path).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as err:
        raise OSError(err.errno, f"cannot append to {path}: {err.strerror or err}") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log (a run folder or its metrics.jsonl). A last line cut short
    (the process was killed or the disk filled during an append) is dropped with a warning; a
    bad line before it is an error."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise TrainingError(f"{path}:{number}: not a JSON record; the metrics log is corrupt") from None
            log.warning("%s: dropping its last line, cut short by an interruption: %r", path, line[:80])
    return records


def training_seconds(folder: Path) -> float | None:
    """Wall seconds a run's training took, from its metrics log; None without one. Each invocation
    logs the seconds since it started, so a resumed training's clock starts again: the last value
    of each invocation is summed (work after the last log of an interrupted one is not counted)."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return None
    total, last = 0.0, 0.0
    for record in read_metrics(path):
        elapsed = record.get("elapsed_s")
        if elapsed is None:
            continue
        if elapsed < last:  # a resumed invocation
            total += last
        last = elapsed
    return round(total + last, 1)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from, so none appears twice."""
    if not Path(path).exists():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


# --------------------------------------------------------------------------- starting and resuming


def check_new_run_folder(folder: Path, world_rank: int = 0) -> None:
    """A new run goes into a new or empty folder, or one whose run stopped before its
    config.toml was written (only checkpoints/ and temporary files inside)."""
    folder = Path(folder)
    if has_checkpoint(folder):
        raise ConfigError(f"{folder} already holds a training run; use --resume {folder} or another --out")
    # Rank 0 alone checks: under torchrun the other ranks may look while rank 0 is creating the run.
    if world_rank != 0 or not folder.is_dir() or is_run(folder):
        return
    foreign = [p.name for p in folder.iterdir() if p.name != "checkpoints" and not p.name.startswith(".")]
    if foreign:
        raise ConfigError(f"{folder} is not empty and not a training run folder (it holds {foreign[0]!r}); "
                          f"give a new or empty --out")


def resume_config(folder: Path, overrides: list[str] | tuple[str, ...] = (),
                  allow_config_change: bool = False) -> Config:
    """The config to resume ``folder`` with: its own config.toml with ``overrides`` applied,
    checked against what its checkpoint was trained with (an edited config.toml would
    otherwise change the run silently). The device and verification settings may change; other
    changes need ``allow_config_change``. A changed config is recorded in config.toml."""
    folder = Path(folder)
    saved = folder / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"cannot resume: {saved} does not exist (is {folder} a training run folder?)")
    checkpoint = folder / CHECKPOINT_FILE
    if not checkpoint.is_file():
        raise ConfigError(f"cannot resume {folder}: it has no checkpoint yet ({checkpoint}; stopped before "
                          f"the first one); start it again with --out {folder}")
    config = load_config(str(saved), overrides)
    state = ckpt.load(checkpoint)
    diff = config_changes(state["config"], config.to_dict(), "resume")
    verify_changes = config_diff({"verify": state["config"].get("verify", {})},
                                 {"verify": config.to_dict()["verify"]})
    end = config.train.warmup_iters + config.train.iters
    if state["step"] > end:
        raise ConfigError(f"cannot resume {folder} to end at step {end}: its checkpoint is at step "
                          f"{state['step']} already (a run cannot be shortened; train a new one)")
    if diff and not allow_config_change:
        raise ConfigError(f"refusing to resume with a changed config (pass --allow-config-change to accept; "
                          f"the checkpoint {checkpoint} was trained with the left-hand values):\n  "
                          + "\n  ".join(diff))
    if diff:
        log.warning("resuming %s with a changed config:\n  %s", folder, "\n  ".join(diff))
    if verify_changes:
        log.info("verification settings of %s changed:\n  %s", folder, "\n  ".join(verify_changes))
    if diff or verify_changes:
        atomic_write_text(saved, config.to_toml())
    return config
