"""Configuration as data: dataclasses with defaults in code, TOML presets, ``--set`` overrides.

Order of precedence (later wins): defaults in the dataclasses below, a TOML file or a preset
shipped in ``privenc/presets/``, then ``--set section.key=value`` flags. Unknown sections and
keys, wrong types and invalid values raise :class:`ConfigError`, which names the key and
lists what is valid.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


# The paper's two groups of ten Places-365 categories (Sec. 4.1 and ../shared/paper/NOTES.md).
PLACES_GROUPS: dict[str, list[str]] = {
    "group1": [
        "arch", "army_base", "airport_terminal", "airfield", "alley", "arena/hockey",
        "amusement_park", "apartment_building/outdoor", "aquarium", "arena/rodeo",
    ],
    "group2": [
        "amphitheater", "auto_showroom", "airplane_cabin", "archaelogical_excavation",
        "art_studio", "artists_loft", "assembly_line", "athletic_field/outdoor",
        "atrium/public", "auto_factory",
    ],
}

SOURCES = ("synthetic", "places365", "folder", "csv")
NORMS = ("none", "batch", "per_location_affine", "per_location")
ENCODER_LOSSES = ("label_flip", "standard_gan", "negative_ce")
POOLS = ("max", "avg")
ATTACKERS = ("paper", "wide", "mlp", "linear")


@dataclass
class DataConfig:
    """Where images come from and how they become tensors (DESIGN.md, "Data")."""

    source: str = "synthetic"
    """One of synthetic | places365 | folder | csv."""
    root: str = ""
    """Dataset root (places365, folder) or the CSV manifest file (csv). Unused for synthetic."""
    image_size: int = 32
    """Side of the square network input, after cropping."""
    load_size: int = 36
    """Side images are resized to (shorter side) before cropping; also the cache resolution."""
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.2])
    """Training augmentation: random rescale of the loaded image by this factor range, then a
    random crop of image_size (the paper's "random scaling + random crop")."""
    split: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    """train / val / test fractions of every category; disjoint by construction."""
    seed: int = 0
    """Seeds the split, the negative sampling of tasks and synthetic generation."""
    groups: dict[str, list[str]] = field(default_factory=dict)
    """Category groups for binary detection tasks. Empty = the source's own groups
    (synthetic: its built-in groups; places365: the paper's two groups; folder/csv: one group
    of all categories)."""
    category_attribute: str = "category"
    """For csv sources: which column holds the category that splits are drawn per and binary
    detection tasks use. Left at "category": that column, or the first attribute column of a CSV
    without one."""
    max_per_category: int = 0
    """Use at most this many images per category (0 = all)."""
    synthetic_per_category: int = 400
    """Synthetic source: images generated per category."""
    cache: bool = True
    """Keep decoded, pre-resized uint8 images in a memmap cache (built once, reused)."""
    cache_dir: str = ""
    """Where caches live; empty = $PRIVENC_CACHE or ~/.cache/privenc."""
    skip_bad_images: bool = False
    """Unreadable images: False = error naming the file; True = skip, count and report."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the main process)."""


@dataclass
class EncoderConfig:
    """The encoder: stages of bias-free convs + normalization + ReLU, pooling between stages,
    a final conv to out_channels, per-location normalization without affine, tanh (Sec. 3)."""

    stages: list[list[int]] = field(default_factory=lambda: [[16, 16], [32, 32]])
    """Conv widths per stage; a pooling layer follows every stage but the last."""
    kernel_size: int = 3
    final_kernel_size: int = 3
    pool: str = "max"
    out_channels: int = 3
    norm: str = "per_location"
    """none | batch (BatchNorm2d, no bias) | per_location_affine | per_location (the paper's)."""


@dataclass
class ClassifierConfig:
    """The private/desirable classifiers, and the 'paper' attacker of verification."""

    stages: list[list[int]] = field(default_factory=lambda: [[32, 32], [64, 64]])
    """Conv widths per stage; max-pooling between stages, global average pooling, linear."""
    kernel_size: int = 3
    batch_norm: bool = True


@dataclass
class TrainConfig:
    """Adversarial training (Sec. 3 and 4.1)."""

    private: list[str] = field(default_factory=lambda: ["g1c0"])
    """Private tasks to inhibit. A task is a category name (binary detection: the category vs
    the other categories of its group, balanced) or 'attribute:<column>' (categorical)."""
    desirable: list[str] = field(default_factory=list)
    """Desirable tasks to keep; N of them are learned by one (N+1)-way classifier."""
    encoder_loss: str = "label_flip"
    """label_flip (the paper's) | standard_gan | negative_ce."""
    alpha: float = 0.0625
    """Weight of the desirable-task cross-entropy in the encoder loss (alpha = 2^-4, Sec. 3)."""
    batch_size: int = 64
    warmup_iters: int = 100
    """Classifier-only iterations against the randomly initialised encoder."""
    iters: int = 1000
    """Alternating (classifier step, encoder step) iterations after warm-up."""
    classifier_steps: int = 1
    """Classifier updates per encoder update in the adversarial phase (the paper alternates one
    and one); more keeps the classifiers closer to the best response the encoder must defeat."""
    classifier_lr: float = 1e-3
    encoder_lr: float = 1e-3
    encoder_lr_decay: float = 0.5623413251903491
    """Encoder LR is multiplied by this every encoder_lr_decay_every iterations (0.1^(1/4))."""
    encoder_lr_decay_every: int = 400
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    log_every: int = 50
    val_batches: int = 4
    """Validation batches (a fixed random sample of the split, drawn with data.seed) used for the
    within-training accuracy and collapse diagnostics."""
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:N."""
    amp: bool = False
    """bf16 autocast on GPU."""
    channels_last: bool = False
    """Channels-last memory format for the networks and their inputs, on any device. It depends
    on the shapes: on a CPU it helps the demo's small maps and hurts the paper preset's
    (benchmarks/layout.py, docs/performance.md), so presets turn it on where it was measured."""


@dataclass
class VerifyConfig:
    """The verification protocol (Sec. 4.1): fresh attackers trained to saturation, one 10x LR
    drop, saturation again; test accuracy of the final and of the best-validation attacker."""

    tasks: list[str] = field(default_factory=list)
    """Tasks `privenc verify` checks without --task, and `privenc grid` without --tasks; empty =
    verify: the encoder's private + desirable tasks (grid then needs --tasks)."""
    attackers: list[str] = field(default_factory=lambda: ["paper"])
    """Attacker families: paper | wide | mlp | linear."""
    seeds: list[int] = field(default_factory=lambda: [0])
    lr: float = 1e-4
    """Adam LR for attackers on encodings (paper: 1e-5)."""
    lr_raw: float = 1e-4
    """Adam LR for attackers on raw images (Identity; paper: 1e-4)."""
    lr_drop: float = 0.1
    batch_size: int = 64
    eval_every: int = 100
    patience: int = 5
    """Saturation: no validation improvement of at least min_delta for this many evaluations."""
    min_delta: float = 0.002
    max_iters: int = 20000
    """Cap per attacker; a run that reaches it is reported as 'not saturated'."""
    views: int = 4
    """Augmented views of each training image, encoded once and cached."""
    channels_last: bool = False
    """Channels-last memory format for the convolutional attackers (see train.channels_last)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "encoder": EncoderConfig,
    "classifier": ClassifierConfig,
    "train": TrainConfig,
    "verify": VerifyConfig,
}


# --------------------------------------------------------------------------- presets and files


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``section.key: old -> new`` for every value of ``new`` (a ``Config.to_dict()``) that
    ``old`` lacks or holds differently; ``ignore`` names keys that may differ."""
    return [f"{section}.{key}: {old.get(section, {}).get(key)!r} -> {value!r}"
            for section, values in new.items() for key, value in values.items()
            if f"{section}.{key}" not in ignore and old.get(section, {}).get(key) != value]


def preset_names() -> list[str]:
    files = resources.files("privenc").joinpath("presets").iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def _read_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from None


def load_config(source: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, then a preset name or TOML file, then ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if source:
        path = Path(source)
        if path.suffix == ".toml" or path.exists():
            if not path.is_file():
                raise ConfigError(f"config file {source!r} does not exist")
            raw = _read_toml(path.read_text(), str(path))
        elif source in preset_names():
            text = resources.files("privenc").joinpath("presets", f"{source}.toml").read_text()
            raw = _read_toml(text, f"preset {source!r}")
        else:
            raise ConfigError(
                f"{source!r} is neither a TOML file nor a preset; presets: {', '.join(preset_names())}"
            )
    for item in overrides:
        _apply_override(raw, item)
    try:
        return from_dict(raw)
    except ConfigError as err:
        if source and source not in preset_names():  # a file: say which (a run's config.toml, say)
            raise ConfigError(f"{source}{' with the --set values' if overrides else ''}: {err}") from None
        raise


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.iters=500")
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"--set {item!r}: unknown section {section!r}; valid: {', '.join(SECTIONS)}")
    raw.setdefault(section, {})[name] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """Values are TOML literals (``3``, ``1e-4``, ``true``, ``[1, 2]``, ``"x"``); anything that
    is not a TOML literal is taken as a bare string (``train.private=army_base``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_dict(raw: dict[str, Any]) -> Config:
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys, got {type(values).__name__}")
        sections[name] = build_section(name, cls, values)
    config = Config(**sections)
    validate(config)
    return config


def build_section(section: str, cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key}; valid keys of [{section}]: {', '.join(names)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        if isinstance(value, str) and args[0] is str:
            return [value]  # --set train.private=army_base means the one-element list
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    else:  # pragma: no cover - a new field type that this function does not know yet
        raise TypeError(f"unsupported config type {hint} for {key}")
    raise ConfigError(f"{key} must be of type {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is None:
        return hint.__name__
    args = ", ".join(_type_name(a) for a in typing.get_args(hint))
    return f"{origin.__name__}[{args}]"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, valid: tuple[str, ...]) -> None:
    _require(value in valid, f"{key} = {value!r} is not valid; choose one of: {', '.join(valid)}")


def validate(config: Config) -> None:
    """Value checks that types alone cannot express; each error names its key."""
    d, e, c, t, v = config.data, config.encoder, config.classifier, config.train, config.verify
    _one_of("data.source", d.source, SOURCES)
    _require(d.source == "synthetic" or bool(d.root), f"data.root must be set for data.source = {d.source!r}")
    _require(d.image_size >= 4, f"data.image_size must be >= 4, got {d.image_size}")
    _require(d.load_size >= d.image_size, f"data.load_size ({d.load_size}) must be >= data.image_size ({d.image_size})")
    _require(len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1],
             f"data.scale_range must be [low, high] with 0 < low <= high, got {d.scale_range}")
    _require(len(d.split) == 3 and all(x >= 0 for x in d.split) and abs(sum(d.split) - 1) < 1e-6,
             f"data.split must be three non-negative fractions summing to 1, got {d.split}")
    _require(all(x > 0 for x in d.split), f"data.split leaves a split empty: {d.split}")
    _require(d.max_per_category >= 0, "data.max_per_category must be >= 0")
    _require(d.synthetic_per_category >= 3, "data.synthetic_per_category must be >= 3")
    _require(d.num_workers >= 0, "data.num_workers must be >= 0")

    _require(len(e.stages) >= 1 and all(len(s) >= 1 for s in e.stages),
             f"encoder.stages must be a non-empty list of non-empty width lists, got {e.stages}")
    _require(all(w > 0 for s in e.stages for w in s), "encoder.stages widths must be positive")
    _require(e.kernel_size % 2 == 1 and e.final_kernel_size % 2 == 1, "encoder kernel sizes must be odd")
    _one_of("encoder.pool", e.pool, POOLS)
    _one_of("encoder.norm", e.norm, NORMS)
    _require(e.out_channels >= 1, "encoder.out_channels must be >= 1")
    _require(len(c.stages) >= 1 and all(w > 0 for s in c.stages for w in s) and all(c.stages),
             f"classifier.stages must be a non-empty list of non-empty positive width lists, got {c.stages}")
    _require(c.kernel_size % 2 == 1, "classifier.kernel_size must be odd")

    _require(len(t.private) >= 1, "train.private must name at least one private task")
    _one_of("train.encoder_loss", t.encoder_loss, ENCODER_LOSSES)
    _require(t.alpha >= 0, f"train.alpha must be >= 0, got {t.alpha}")
    _require(t.batch_size >= 2,
             f"train.batch_size must be >= 2 (per-location statistics need a batch), got {t.batch_size}")
    _require(t.warmup_iters >= 0 and t.iters >= 0, "train.warmup_iters and train.iters must be >= 0")
    _require(t.classifier_steps >= 1, f"train.classifier_steps must be >= 1, got {t.classifier_steps}")
    for key in ("classifier_lr", "encoder_lr"):
        _require(getattr(t, key) > 0, f"train.{key} must be > 0, got {getattr(t, key)}")
    _require(0 < t.encoder_lr_decay <= 1, "train.encoder_lr_decay must be in (0, 1]")
    _require(t.encoder_lr_decay_every >= 1, "train.encoder_lr_decay_every must be >= 1")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas must be two numbers in [0, 1)")
    _require(t.log_every >= 1 and t.checkpoint_every >= 1 and t.val_batches >= 1,
             "train.log_every, train.checkpoint_every and train.val_batches must be >= 1")
    _require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t.device) is not None,
             f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")

    for name in v.attackers:
        _one_of("verify.attackers[]", name, ATTACKERS)
    _require(len(v.attackers) >= 1 and len(v.seeds) >= 1, "verify.attackers and verify.seeds must be non-empty")
    _require(v.lr > 0 and v.lr_raw > 0, "verify.lr and verify.lr_raw must be > 0")
    _require(0 < v.lr_drop < 1, "verify.lr_drop must be in (0, 1)")
    _require(v.batch_size >= 1 and v.eval_every >= 1 and v.patience >= 1 and v.max_iters >= 1,
             "verify.batch_size, eval_every, patience and max_iters must be >= 1")
    _require(v.min_delta >= 0, "verify.min_delta must be >= 0")
    _require(v.views >= 1, "verify.views must be >= 1")


# --------------------------------------------------------------------------- writing


def dump_toml(data: dict[str, Any]) -> str:
    """Write a two-level dict of plain values as TOML (enough for Config; no dependency)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


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


def write_run_config(config: Config, run_dir: Path) -> None:
    """Record the resolved config (config.toml) and provenance (meta.json) in a run folder
    (atomically: a crash mid-write must not leave a half config that a resume would read)."""
    from privenc.checkpoint import atomic_write_text  # imports torch: not at module level

    atomic_write_text(run_dir / "config.toml", config.to_toml())
    from privenc import __version__

    meta = {"privenc": __version__, "git_revision": git_revision(), "python": sys.version.split()[0]}
    try:
        import torch

        meta["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    atomic_write_text(run_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
