"""The configuration's schema: one dataclass per section with its defaults, what each value
may be (:func:`validate`), and how a config is written as TOML.

How a config is put together from a preset, a file and ``--set`` flags is
:mod:`privenc.config`, which re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from privenc.errors import ConfigError

# The paper's two groups of ten Places-365 categories (Sec. 4.1).
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
    """Where images come from and how they become tensors."""

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
    group_by: str = ""
    """An attribute (a CSV column, e.g. "person") whose values are never split: every image with
    the same value goes to one split, so no attacker can key on identity. Empty = per image."""
    max_per_category: int = 0
    """Use at most this many images per category (0 = all)."""
    synthetic_per_category: int = 400
    """Synthetic source: images generated per category."""
    cache: bool = True
    """Keep decoded, pre-resized uint8 images in a memmap cache (built once, reused), and the
    reconstruction attack's raw-image attackers (fitted once per images and protocol)."""
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

    private: list[str] = field(default_factory=list)
    """Private tasks to inhibit. A task is a category name (binary detection: the category vs
    the other categories of its group, balanced) or 'attribute:<column>' (categorical). Empty by
    default: task names belong to a data source, so a preset or the user names them (`train`
    refuses to start without one)."""
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
    private_ensemble: int = 1
    """Private classifiers per private task (1 = the paper's one). K > 1: K independently
    initialized classifiers that the encoder must defeat together, its private term being the
    mean of its loss against each (Wu et al., ECCV 2018, "budget model ensemble"); each logged
    private accuracy is then the best member's, with the mean beside it."""
    adversary_reset_every: int = 0
    """Re-initialize a private classifier every this many encoder steps (0 = never): fresh
    weights and fresh Adam moments, one ensemble member at a time in rotation, so the encoder
    always faces trained members too (Wu et al., ECCV 2018, "budget model restarting"). The
    desirable classifier is never reset."""
    kurtosis_limit: float = 0.0
    """0 (the paper's loss) or a bound on the kurtosis over the batch of every encoder output
    element before the tanh: the encoder also pays the mean excess above it (losses.tail_penalty).
    Unit variance alone can be met by an output that is constant for nearly every image and far
    off for a few (docs/results.md: the variance-only encoders); a normal distribution's kurtosis
    is 3, the -gender +smiling encoders on lfw-faces read 3.0-3.5 on their test images, the heavy-
    tailed ones 9-270."""
    recalibrate_images: int = 4096
    """After training, the encoder's normalization statistics are re-estimated, layer by layer,
    on up to this many training images seen through the evaluation view (norms.recalibrate):
    the running averages that training leaves come from augmented batches and a moving encoder,
    and on unseen photos they left output elements with well under the unit variance that the
    variance constraint asks for (docs/results.md). 0 keeps them."""
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
    on the shapes and the device: on a CPU it helps the demo's small maps and hurts the paper
    preset's, on a GPU it helps the paper preset's (benchmarks/layout.py, benchmarks/gpu_check.py,
    docs/performance.md), so presets turn it on where it was measured."""
    compile: bool = False
    """torch.compile the encoder for the training steps (validation, re-estimated statistics and
    the saved file use the plain module). Its first steps pay the compilation (about 45 s for the
    paper preset on a GPU); the paper preset turns it on, where a GPU measured it faster."""


@dataclass
class VerifyConfig:
    """The verification protocol (Sec. 4.1): fresh attackers trained to saturation, one 10x LR
    drop, saturation again; test accuracy of the final and of the best-validation attacker."""

    tasks: list[str] = field(default_factory=list)
    """Tasks `privenc verify` checks without --task, and `privenc grid` without --tasks; empty =
    verify: the encoder's private + desirable tasks (grid then needs --tasks)."""
    attackers: list[str] = field(default_factory=lambda: ["paper"])
    """Attacker families: paper | wide | mlp | linear, trained from scratch; and adaptive, the
    run's saved adversary of a private task fine-tuned (a run folder's private tasks only;
    elsewhere it is left out)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    lr: float = 1e-4
    """Adam LR for attackers on encodings (paper: 1e-5)."""
    lr_raw: float = 1e-4
    """Adam LR for attackers on raw images (Identity; paper: 1e-4)."""
    lr_adaptive: float = 0.0
    """Adam LR for the adaptive attacker, which fine-tunes an already trained classifier; 0 = ``lr``."""
    min_iters_adaptive: int = 0
    """No LR drop and no stop of the adaptive attacker before this many iterations, whatever the
    patience: fine-tuned from an adversary the encoder has defeated, it can sit on a plateau at its
    start before it climbs."""
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
    calibrate: bool = False
    """Score every attacker checkpoint also with calibrated decision rules and keep, on
    validation, the best: a threshold on the logit margin tuned on validation (binary tasks), and
    each split normalized by its own BatchNorm statistics (AdaBN: an attacker holding a set of
    encodings can). The information estimate then uses the chosen logits after a temperature and
    bias fitted on validation. Off = argmax with the running statistics, the paper's way."""

    def family_lr(self, family: str, lr: float) -> float:
        """The Adam LR of attacker ``family`` where the encoder's own attacker LR is ``lr``:
        ``lr_adaptive`` for the adaptive family when set, else ``lr``."""
        return self.lr_adaptive if family == "adaptive" and self.lr_adaptive > 0 else lr

    def family_min_iters(self, family: str) -> int:
        """Iterations before attacker ``family`` may saturate: ``min_iters_adaptive`` for the
        adaptive family, else 0."""
        return self.min_iters_adaptive if family == "adaptive" else 0


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


# --------------------------------------------------------------------------- validation


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

    _one_of("train.encoder_loss", t.encoder_loss, ENCODER_LOSSES)
    _require(t.alpha >= 0, f"train.alpha must be >= 0, got {t.alpha}")
    _require(t.batch_size >= 2,
             f"train.batch_size must be >= 2 (per-location statistics need a batch), got {t.batch_size}")
    _require(t.warmup_iters >= 0 and t.iters >= 0, "train.warmup_iters and train.iters must be >= 0")
    _require(t.classifier_steps >= 1, f"train.classifier_steps must be >= 1, got {t.classifier_steps}")
    _require(t.private_ensemble >= 1,
             f"train.private_ensemble must be >= 1 (private classifiers per private task; 1 = the paper's one), "
             f"got {t.private_ensemble}")
    _require(t.recalibrate_images >= 0,
             f"train.recalibrate_images must be >= 0 (training images for the encoder's final normalization "
             f"statistics; 0 = keep the running statistics of training), got {t.recalibrate_images}")
    _require(t.kurtosis_limit == 0 or t.kurtosis_limit > 1,
             f"train.kurtosis_limit must be 0 (off) or above 1 (a kurtosis is at least 1; 3 = a normal "
             f"distribution's), got {t.kurtosis_limit}")
    _require(t.adversary_reset_every >= 0,
             f"train.adversary_reset_every must be >= 0 (encoder steps between resets of a private classifier; "
             f"0 = never), got {t.adversary_reset_every}")
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
        _one_of("verify.attackers[]", name, (*ATTACKERS, "adaptive"))
    _require(any(name in ATTACKERS for name in v.attackers),
             f"verify.attackers needs a family trained from scratch ({', '.join(ATTACKERS)}): 'adaptive' starts "
             f"from a run's saved adversary, which only a run's private tasks have")
    _require(len(v.attackers) >= 1 and len(v.seeds) >= 1, "verify.attackers and verify.seeds must be non-empty")
    _require(v.lr > 0 and v.lr_raw > 0, "verify.lr and verify.lr_raw must be > 0")
    _require(v.lr_adaptive >= 0, "verify.lr_adaptive must be >= 0 (0: verify.lr)")
    _require(0 < v.lr_drop < 1, "verify.lr_drop must be in (0, 1)")
    _require(v.batch_size >= 1 and v.eval_every >= 1 and v.patience >= 1 and v.max_iters >= 1,
             "verify.batch_size, eval_every, patience and max_iters must be >= 1")
    _require(v.min_delta >= 0, "verify.min_delta must be >= 0")
    _require(v.min_iters_adaptive >= 0,
             f"verify.min_iters_adaptive must be >= 0 (0: saturation may come at any time), got {v.min_iters_adaptive}")
    _require(v.views >= 1, "verify.views must be >= 1")


# --------------------------------------------------------------------------- writing


def dump_toml(data: dict[str, Any]) -> str:
    """Write a config dict as TOML: one table per section, nested dicts as subtables.

    tomli-w does the quoting and escaping (strings with quotes or backslashes, lists of lists);
    it writes every array one item a line, which is longer but still plain TOML, so
    config.toml files written by earlier versions (arrays inline) load the same.
    """
    return tomli_w.dumps(data)
