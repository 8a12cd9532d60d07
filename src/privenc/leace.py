"""A closed-form linear eraser as a reference encoder: LEACE (Belrose et al., "LEACE: Perfect
linear concept erasure in closed form", NeurIPS 2023), via the ``concept-erasure`` package.

LEACE is the smallest affine change of the image (in the data's own covariance metric) after
which every class of one private task has the same mean: no linear classifier can then beat a
constant one on that task. Beside Identity and Naive Blur it answers "what does the cheapest
possible privacy, one linear projection fitted in closed form, achieve?": the learned encoder is
worth its training where it hides more than LEACE against nonlinear attackers, or keeps more.

The eraser works on flattened pixels, whose covariance is (3 S^2)^2: 600 MB in float32 at 64 px,
38 GB at 224 px. Above :data:`MAX_FULL_SIZE` it works on the image downsampled (area average) to
the learned encoder's output size, the size Naive Blur has; ``size`` forces another.

``privenc erase`` writes a folder like a training run (config.toml with the task as
``train.private``, meta.json, splits/, tasks.json) whose ``encoder.pt`` holds the eraser with
kind ``"leace"``; verify, grid, report and audit take that folder as they take a run's.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from privenc import checkpoint as ckpt
from privenc import runs
from privenc.config import Config
from privenc.data import TaskData, prepare
from privenc.data.transforms import BatchTransform
from privenc.errors import CheckpointError, ConfigError, DataError
from privenc.models import encoder_output_size

log = logging.getLogger(__name__)

KIND = "leace"
MAX_FULL_SIZE = 64
"""Largest image side erased at full resolution; above it the default is the learned encoder's
output size (a (3 S^2)^2 covariance and its eigendecomposition stop fitting a workstation)."""
MAX_FEATURES = 3 * MAX_FULL_SIZE ** 2
"""Most pixels the eraser may work on, also with ``size`` given (12288: a 1.2 GB float64
covariance, a few copies of it in the eigendecomposition)."""
FIT_BATCH = 256
"""Images per moment update: each costs d^2 per image whatever the batch, larger ones only
amortize the Python overhead."""


class LeaceEncoder(nn.Module):
    """Image -> (optional area downsample to ``size``) -> flatten -> LEACE -> (C, size, size).

    The eraser is ``x - ((x - mean) @ proj_right.T) @ proj_left.T``: the identity minus a rank-r
    correction (r <= classes), stored as two (d, r) factors rather than a (d, d) matrix. The
    output keeps the image's shape and value range, so every attacker family trains on it as on
    any encoding. All state is buffers: it saves and loads with its state_dict, on any device.
    """

    def __init__(self, image_size: int, size: int, rank: int, task: str = "", in_channels: int = 3) -> None:
        super().__init__()
        if not 1 <= size <= image_size:
            raise ValueError(f"LeaceEncoder size must be in [1, image_size={image_size}], got {size}")
        self.image_size, self.size = image_size, size
        self.task = task  # the private task it erases (metadata: the file records it)
        self._output_shape = (in_channels, size, size)
        features = in_channels * size * size
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("proj_left", torch.zeros(features, rank))
        self.register_buffer("proj_right", torch.zeros(rank, features))

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self._output_shape

    def extra_repr(self) -> str:
        return f"task={self.task!r}, image_size={self.image_size}, size={self.size}, rank={self.proj_left.shape[1]}"

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images -> (B, C*size*size): what the eraser was fitted on."""
        if self.size != self.image_size:
            # Area average: the least lossy linear downsample, so the eraser sees as much of the
            # image as the size allows (Blur's wide box filter would blur first).
            x = F.adaptive_avg_pool2d(x, self.size)
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) images in [-1, 1] -> (B, C, size, size) erased images."""
        flat = self.pixels(x)
        erased = flat - ((flat - self.mean) @ self.proj_right.T) @ self.proj_left.T
        return erased.view(len(x), *self._output_shape)


# --------------------------------------------------------------------------- fitting


def default_size(config: Config) -> int:
    """Full resolution up to :data:`MAX_FULL_SIZE`, else the learned encoder's output size."""
    image_size = config.data.image_size
    if image_size <= MAX_FULL_SIZE:
        return image_size
    try:
        return encoder_output_size(config.encoder, image_size)
    except ValueError as err:
        raise ConfigError(f"erase: {err}; or give --size") from None


def check_size(size: int, image_size: int) -> None:
    if not 1 <= size <= image_size:
        raise ConfigError(f"erase: --size {size} must be between 1 and the image size {image_size} (data.image_size)")
    if 3 * size * size > MAX_FEATURES:
        raise ConfigError(f"erase: --size {size} gives {3 * size * size} pixels, whose covariance is too large to fit "
                          f"(at most {MAX_FEATURES}: size {MAX_FULL_SIZE}); give --size {MAX_FULL_SIZE} or less")


def fit(config: Config, data: TaskData, size: int | None = None, device: str | torch.device = "cpu",
        progress: bool = True) -> tuple[LeaceEncoder, dict[str, Any]]:
    """Fit LEACE for the task of ``data`` (one task, from :func:`~privenc.data.prepare`) on its
    training split, seen through the evaluation transform (the distribution attackers are scored
    on), streaming the images through LeaceFitter's running moments. Returns the encoder and what
    its file records: the task, its classes, the number of images, and the largest distance of a
    class mean from the overall mean before and after erasure (the latter ~0: the erasure is
    exact on these moments).

    The trace constraint of LeaceFitter is off: it mixes the eraser with an orthogonal projection
    that keeps the covariance trace, for erasers injected back into a network, and the mixture no
    longer equalizes the class means. Here fresh attackers train on the output, so exactness wins."""
    from concept_erasure import LeaceFitter

    image_size = config.data.image_size
    size = default_size(config) if size is None else size
    check_size(size, image_size)
    spec = data.tasks[0]
    task = spec.name
    classes = spec.num_classes
    if classes < 2:
        raise ConfigError(f"erase: task {task!r} has a single class ({spec.classes[0]!r}); nothing to erase")
    device = torch.device(device)
    encoder = LeaceEncoder(image_size, size, classes, task).to(device)
    features = encoder.mean.numel()
    # float64 moments: pixel covariances are badly conditioned, and the erasure is exact only
    # as far as the eigendecomposition is.
    fitter = LeaceFitter(features, classes, constrain_cov_trace=False, device=device, dtype=torch.float64)
    class_sums = torch.zeros(classes, features, dtype=torch.float64, device=device)
    counts = torch.zeros(classes, dtype=torch.float64, device=device)
    transform = BatchTransform(config.data, augment=False)
    loader = torch.utils.data.DataLoader(data.uint8_dataset("train"), batch_size=FIT_BATCH, shuffle=False)
    for images, labels in tqdm(loader, desc=f"erase {task}: moments", leave=False, disable=not progress):
        x = encoder.pixels(transform(images.to(device))).double()   # (B, d)
        y = labels[:, 0].to(device)
        known = y >= 0  # a categorical task's unknown value has no class to erase towards
        x, onehot = x[known], F.one_hot(y[known], classes).double()  # (B', d), (B', K)
        fitter.update(x, onehot)
        class_sums += onehot.T @ x
        counts += onehot.sum(0)
    if (counts == 0).any():
        empty = [spec.classes[k] for k in range(classes) if counts[k] == 0]
        raise DataError(f"erase: task {task!r} has no training image of class {', '.join(map(repr, empty))}; "
                          f"LEACE needs every class in the training split")
    log.info("erase %s: eraser of %d pixels from %d training images", task, features, int(counts.sum()))
    eraser = fitter.eraser
    encoder.mean.copy_(eraser.bias.float())
    encoder.proj_left.copy_(eraser.proj_left.float())
    encoder.proj_right.copy_(eraser.proj_right.float())
    means, overall = class_sums / counts[:, None], class_sums.sum(0) / counts.sum()
    erased = eraser(means) - eraser(overall[None])
    info = {"task": task, "classes": list(spec.classes), "size": size, "n_train": int(counts.sum()),
            "class_mean_gap_before": float((means - overall).norm(dim=1).max()),
            "class_mean_gap_after": float(erased.norm(dim=1).max())}
    log.info("erase %s: largest distance of a class mean from the mean: %.4g before, %.2g after",
             task, info["class_mean_gap_before"], info["class_mean_gap_after"])
    return encoder.cpu().eval(), info


# --------------------------------------------------------------------------- the folder


def erase(config: Config, task: str, out_dir: Path | str, size: int | None = None, device: str = "auto",
          progress: bool = True) -> Path:
    """Fit LEACE for ``task`` and write it as a folder that verify, grid, report and audit take
    like a run: config.toml (``task`` as ``train.private``; the config's other desirable tasks
    stay desirable), meta.json, the data split, and ``encoder.pt`` (written last: a folder
    without it is not finished). Returns the encoder file."""
    from privenc.distributed import resolve_device

    out_dir = Path(out_dir)
    check_new_folder(out_dir)
    if size is not None:
        check_size(size, config.data.image_size)
    data = prepare(config.data, [task])  # an unknown task fails here, before any work
    encoder, info = fit(config, data, size, resolve_device(device), progress)
    config = copy.deepcopy(config)
    config.train.private = [task]
    config.train.desirable = [t for t in config.train.desirable if t != task]
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.write_config(config, out_dir)
    data.write(out_dir)
    path = out_dir / runs.ENCODER_FILE
    save_eraser(path, encoder, info)
    return path


def check_new_folder(folder: Path) -> None:
    """``erase`` writes into a new or empty folder; anything else is named."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"erase: --out {folder} is a file; give a new or empty folder")
    if runs.is_finished(folder) and _kind_of(folder / runs.ENCODER_FILE) == KIND:
        raise ConfigError(f"erase: {folder} already holds a LEACE eraser; give another --out, or delete the folder "
                          f"to fit it again")
    if runs.is_finished(folder):
        raise ConfigError(f"erase: {folder} is a training run folder; give a new or empty --out")
    if runs.is_run(folder):
        raise ConfigError(f"erase: {folder} holds a {runs.CONFIG_FILE} but no {runs.ENCODER_FILE} (a training run, or "
                          f"an erase that stopped before writing its eraser); give a new --out, or delete the folder")
    entries = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    if entries:
        raise ConfigError(f"erase: {folder} is not empty (it holds {entries[0]!r}); give a new or empty --out")


def _kind_of(path: Path) -> str | None:
    try:
        return ckpt.load(path).get("kind")
    except CheckpointError:
        return None


def save_eraser(path: Path, encoder: LeaceEncoder, info: dict[str, Any]) -> None:
    """The eraser with what rebuilds it (input size, size, rank) and what it was fitted on."""
    from importlib.metadata import version

    ckpt.save(path, {
        "kind": KIND,
        "image_size": encoder.image_size,
        "output_shape": list(encoder.output_shape),
        "rank": encoder.proj_left.shape[1],
        "concept_erasure": version("concept-erasure"),
        **info,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
    })


def read_eraser(path: Path, device: str | torch.device = "cpu") -> LeaceEncoder:
    """Load an eraser strictly, in eval mode; every way the file can be wrong is a
    CheckpointError that names it."""
    path = Path(path)
    if path.is_dir():
        path = path / runs.ENCODER_FILE
    payload = ckpt.load(path, map_location=device)
    if payload.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a LEACE eraser (kind={payload.get('kind')!r})")
    try:
        channels, size, _ = payload["output_shape"]
        encoder = LeaceEncoder(int(payload["image_size"]), int(size), int(payload["rank"]), str(payload["task"]),
                               int(channels))
    except KeyError as err:
        raise CheckpointError(f"{path}: LEACE file without {err}") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: the eraser it describes cannot be built: {err}") from None
    ckpt.load_state(encoder, payload["state_dict"], f"{path}: eraser")
    if not all(torch.isfinite(v).all() for v in payload["state_dict"].values()):
        raise CheckpointError(f"{path}: the eraser holds non-finite values (NaN or Inf)")
    return encoder.to(device).eval()


def label(task: str) -> str:
    """How tables name an eraser: by what it erases, as runs are named by their roles."""
    return f"LEACE {runs.role_label([task], [])}"
