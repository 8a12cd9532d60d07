"""The reconstruction attack: can the image be recovered from its encoding?

Classifier attackers ask whether a fixed encoding predicts an attribute. This attack asks a
broader question: a decoder is trained on the training split to invert the fixed encoder
(encoding -> the image the encoder saw), and its reconstructions of the test images are scored

- by PSNR and SSIM against the originals, beside the same scores of a trivial reconstruction
  (the mean training image, what a decoder that learned nothing would output), so that a number
  can be read without knowing the data;
- by what an **Identity attacker** sees in them: a classifier trained on raw images of the task
  (the ``paper`` family at ``verify.lr_raw`` under the encoder's ``[verify]`` protocol, the
  checkpoint chosen on raw validation images) is applied to the reconstructed validation and
  test images. A private attribute that survives the encoder in a recoverable, image-like form
  shows up here even when no attacker was trained on encodings.

Like verification it follows the probe pattern: the encoder is frozen while the decoder
trains on its cached outputs and checked unchanged afterwards. Every encoder kind takes it:
learned run folders, the Identity and Blur baselines, and any module with (C, h, w) outputs.

Ranges: the decoder is trained with MSE (optionally plus L1) in the encoder's input range
[-1, 1] (:mod:`privenc.data.transforms`), and its validation MSEs are reported there; PSNR and
SSIM are computed on [0, 1] pixels (``(x + 1) / 2``, clamped), data range 1, per test image
and averaged over the test images.

:func:`reconstruction_attack` is the entry point; the audit's registry of extra attacks calls it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from privenc import __version__, checkpoint
from privenc.atomic import ensure_writable
from privenc.attackers import (
    AttackerResult,
    Encoded,
    bootstrap_balanced_accuracy,
    encode_task,
    fit_classifier,
    score_split,
)
from privenc.config import Config
from privenc.data import TaskData, prepare
from privenc.data.cache import cache_root
from privenc.distributed import resolve_device
from privenc.encoders import LoadedEncoder, assert_unchanged, freeze
from privenc.errors import CheckpointError, ConfigError, VerificationError
from privenc.figures import _save_figure, equalize
from privenc.models import Classifier, build_attacker
from privenc.verification import attacker_record

log = logging.getLogger(__name__)

FIGURE_IMAGES = 8
"""Test images shown side by side in the figure."""


@dataclass
class DecoderSettings:
    """How the decoder is trained: Adam on random batches of the cached training pairs, the
    validation MSE evaluated every ``eval_every`` iterations, stopped after ``patience``
    evaluations without a relative improvement of ``min_delta`` (or at ``max_iters``); the
    checkpoint with the best validation MSE is kept."""

    width: int = 32
    """Channels of every decoder convolution."""
    lr: float = 1e-3
    batch_size: int = 64
    eval_every: int = 50
    patience: int = 5
    min_delta: float = 0.01
    """Relative: an evaluation improves when its MSE is below (1 - min_delta) x the best so far."""
    max_iters: int = 3000
    l1_weight: float = 0.0
    """Weight of an L1 term added to the MSE (sharper reconstructions; 0 = MSE only)."""

    def check(self) -> None:
        for name in ("width", "batch_size", "eval_every", "patience", "max_iters"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ConfigError(f"reconstruction decoder setting {name} must be a whole number >= 1, "
                                  f"got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"reconstruction decoder lr must be above 0, got {self.lr!r}")
        if not (0 <= self.min_delta < 1 and self.l1_weight >= 0):
            raise ConfigError(f"reconstruction decoder min_delta must be in [0, 1) and l1_weight >= 0, got "
                              f"{self.min_delta!r} and {self.l1_weight!r}")


# --------------------------------------------------------------------------- the decoder


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Decoder(nn.Module):
    """(B, C, h, w) encodings -> (B, 3, S, S) images in the encoder's input range (unbounded).

    Two 3x3 conv blocks at the encoding's resolution, then ``ceil(log2(S / h))`` times a 2x
    nearest upsampling followed by a conv block (resize + conv rather than transposed
    convolutions, which leave checkerboard artefacts), a bilinear resize to exactly S x S where
    the factor is not a power of two, and a 3x3 conv to RGB. Encodings are standardized per
    channel with the training split's statistics (``set_input_statistics``), so an encoder of
    any output scale trains at the same learning rate.
    """

    def __init__(self, encoding_shape: tuple[int, int, int], image_size: int, width: int) -> None:
        super().__init__()
        channels, height, _ = encoding_shape
        self.image_size = image_size
        upsamplings = max(0, math.ceil(math.log2(image_size / height)))
        layers = _block(channels, width) + _block(width, width)
        for _ in range(upsamplings):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *_block(width, width)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, 3, 3, padding=1)
        self.register_buffer("input_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("input_std", torch.ones(1, channels, 1, 1))

    def set_input_statistics(self, encodings: torch.Tensor) -> None:
        """Per-channel mean and standard deviation of (N, C, h, w) training encodings."""
        self.input_mean.copy_(encodings.mean(dim=(0, 2, 3)).view_as(self.input_mean))
        # a constant channel (std 0) stays constant instead of dividing by zero
        self.input_std.copy_(encodings.std(dim=(0, 2, 3)).clamp(min=1e-6).view_as(self.input_std))

    def forward(self, encodings: torch.Tensor) -> torch.Tensor:
        x = self.body((encodings - self.input_mean) / self.input_std)  # (B, width, h * 2^k, w * 2^k)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.head(x)


# --------------------------------------------------------------------------- encoding pairs


@dataclass
class Pairs:
    """The encoder's inputs and outputs of one task's pool, per split (train: ``views``
    augmented views of each image), with the task's labels."""

    images: dict[str, torch.Tensor]      # (N, 3, S, S) in [-1, 1]
    encodings: dict[str, torch.Tensor]   # (N, C, h, w)
    labels: dict[str, torch.Tensor]      # (N,)
    num_classes: int

    def raw(self) -> Encoded:
        """The images as Identity's encodings: what the raw-image attacker trains on."""
        return Encoded(self.images, self.labels, self.num_classes)


def encode_pairs(encoder: nn.Module, data: TaskData, views: int, batch_size: int, device: torch.device,
                 progress: bool = False) -> Pairs:
    """:func:`~privenc.attackers.encode_task`, keeping each encoding's input image: the decoder's
    target is the very (augmented) image that was encoded. With the global generator seeded as
    :func:`~privenc.attackers.encode_for_attackers` seeds it, the images are exactly Identity's
    encodings in verification."""
    encoded = encode_task(encoder, data, views, batch_size, device, progress, keep_inputs=True)
    shape = tuple(encoded.x["train"].shape[1:])
    if len(shape) != 3:
        raise VerificationError(f"the reconstruction attack decodes (C, h, w) encodings; the encoder gives {shape} "
                                f"per image")
    return Pairs(encoded.inputs, encoded.x, encoded.y, encoded.num_classes)


# --------------------------------------------------------------------------- training the decoder


@torch.no_grad()
def decode(decoder: nn.Module, encodings: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Reconstructions of (N, C, h, w) encodings, on the CPU, clamped to the input range [-1, 1]."""
    decoder.eval()
    parts = [decoder(encodings[i:i + batch_size].to(device)).float().cpu()
             for i in range(0, len(encodings), batch_size)]
    decoder.train()
    return torch.cat(parts).clamp_(-1, 1)


def _mse(decoder: nn.Module, encodings: torch.Tensor, images: torch.Tensor, device: torch.device) -> float:
    decoder.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(encodings), 256):
            output = decoder(encodings[i:i + 256].to(device)).float()
            total += float(F.mse_loss(output, images[i:i + 256].to(device), reduction="sum"))
    decoder.train()
    return total / images.numel()


@dataclass
class DecoderResult:
    iters: int
    saturated: bool          # stopped by patience, not by max_iters
    val_mse_initial: float   # before any step: the untrained decoder
    val_mse_best: float
    curve: list[list[float]] = field(default_factory=list)  # [iteration, validation MSE]


def fit_decoder(decoder: Decoder, pairs: Pairs, settings: DecoderSettings, seed: int, device: torch.device,
                progress: bool = False, label: str = "decoder") -> DecoderResult:
    """Train ``decoder`` on the training pairs; it ends holding its best-validation checkpoint."""
    decoder.set_input_statistics(pairs.encodings["train"])
    decoder.to(device).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = pairs.encodings["train"], pairs.images["train"]
    x_val, y_val = pairs.encodings["val"], pairs.images["val"]
    batch = min(settings.batch_size, len(x_train))
    initial = _mse(decoder, x_val, y_val, device)
    best, best_state, since_best = initial, copy.deepcopy(decoder.state_dict()), 0
    curve = [[0, initial]]
    iteration, saturated = 0, False
    bar = tqdm(total=settings.max_iters, desc=label, leave=False, disable=not progress, unit="it")
    while iteration < settings.max_iters:
        # one step towards the encoder's input: MSE (+ L1) in [-1, 1]
        index = torch.randint(len(x_train), (batch,), generator=generator)
        output = decoder(x_train[index].to(device)).float()
        target = y_train[index].to(device)
        loss = F.mse_loss(output, target)
        if settings.l1_weight:
            loss = loss + settings.l1_weight * F.l1_loss(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        bar.update(1)
        if iteration % settings.eval_every and iteration != settings.max_iters:
            continue
        if not torch.isfinite(loss):  # checked when evaluating (no GPU sync per step)
            raise VerificationError(f"{label}: non-finite decoder loss by iteration {iteration} (lr {settings.lr:g}); "
                                    f"lower the decoder's lr")
        val = _mse(decoder, x_val, y_val, device)
        curve.append([iteration, val])
        if val < best * (1 - settings.min_delta):
            best, best_state, since_best = val, copy.deepcopy(decoder.state_dict()), 0
        else:
            since_best += 1
            if val < best:  # better, if not by enough to count as progress: still the one to keep
                best, best_state = val, copy.deepcopy(decoder.state_dict())
        bar.set_postfix(val_mse=f"{val:.4f}", best=f"{best:.4f}")
        if since_best >= settings.patience:
            saturated = True
            break
    bar.close()
    decoder.load_state_dict(best_state)
    return DecoderResult(iteration, saturated, initial, best, curve)


# --------------------------------------------------------------------------- scores


def _ssim_kernel(image_size: int) -> int:
    """SSIM's usual 11-pixel Gaussian window, narrowed (odd) for images smaller than it."""
    return min(11, image_size if image_size % 2 else image_size - 1)


def image_scores(reconstructions: torch.Tensor, originals: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of (N, 3, S, S) reconstructions against the originals,
    both in [-1, 1]; computed on [0, 1] pixels with data range 1."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    size = originals.shape[-1]
    # torchmetrics' SSIM holds about 1.7 kB per input value at once (measured: 1.6 GB for 300
    # images of 32x32 in one call), so images go in chunks of about 2^15 pixels.
    chunk = max(1, 2 ** 15 // (size * size))
    psnr, ssim = [], []
    for i in range(0, len(originals), chunk):
        preds = ((reconstructions[i:i + chunk] + 1) / 2).clamp(0, 1).double()
        target = ((originals[i:i + chunk] + 1) / 2).clamp(0, 1).double()
        psnr.append(peak_signal_noise_ratio(preds, target, data_range=1.0, dim=(1, 2, 3), reduction="none"))
        ssim.append(structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none",
                                                        kernel_size=_ssim_kernel(size)))
    return {"psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean())}


# --------------------------------------------------------------------------- the Identity attacker


RAW_ATTACKER_FORMAT = 1
"""Part of the kept attacker's key: bump it when what :func:`fit_classifier` returns for the same
inputs changes, so that no attacker fitted by older code is reused."""


def identity_attacker(raw: Encoded, config: Config, seed: int, device: torch.device, progress: bool = False,
                      label: str = "") -> tuple[nn.Module, AttackerResult]:
    """The ``paper`` attacker trained on raw images under ``config``'s ``[verify]`` protocol (at
    ``verify.lr_raw``), its best-validation checkpoint loaded, and its fit.

    It depends on the images and the protocol, not on the encoder: an audit of every encoder of
    a sweep would train the same one again each time. With ``data.cache`` on it is kept beside
    the image caches, in ``CACHE/attackers/raw-paper-<key>.pt``, the key a digest of the images
    and labels of every split (bytes), the ``[verify]`` and ``[classifier]`` settings, the seed,
    the device type and the code's version; any other encoder on the same images reuses it, with
    the same numbers as a fresh fit. A kept file that cannot be read is fitted again and replaced."""
    verify = config.verify
    torch.manual_seed(seed)
    classifier = build_attacker("paper", config.classifier, 3, raw.num_classes, config.data.image_size)
    path = _kept_attacker_path(raw, config, seed, device) if config.data.cache else None
    if path is not None and path.is_file():
        try:
            kept = checkpoint.load(path)
            classifier.load_state_dict(kept["state"])
            fitted = AttackerResult(**kept["result"])
        except (CheckpointError, KeyError, TypeError, RuntimeError) as err:
            log.warning("%s is unreadable (%s); fitting the raw-image attacker again", path, err)
        else:
            log.info("%s: reusing the raw-image attacker %s", label or "reconstruction", path)
            classifier = classifier.to(device).train()
            if isinstance(classifier, Classifier) and verify.channels_last:  # as fit_classifier leaves it
                classifier = classifier.to(memory_format=torch.channels_last)
            return classifier, fitted
    fitted = fit_classifier(classifier, raw, verify, verify.lr_raw, seed, device, "paper", progress,
                            label=label)  # leaves the best-validation checkpoint in place
    if path is not None:
        checkpoint.save(path, {"state": classifier.state_dict(), "result": asdict(fitted)})
    return classifier, fitted


def _kept_attacker_path(raw: Encoded, config: Config, seed: int, device: torch.device) -> Path:
    settings = config.to_dict()
    h = hashlib.sha256(json.dumps({"format": RAW_ATTACKER_FORMAT, "version": __version__, "seed": seed,
                                   "device": device.type, "verify": settings["verify"],
                                   "classifier": settings["classifier"]}, sort_keys=True).encode())
    for split in ("train", "val", "test"):
        for tensor in (raw.x[split], raw.y[split]):
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # hashed in place
    return cache_root(config.data) / "attackers" / f"raw-paper-{h.hexdigest()[:32]}.pt"


# --------------------------------------------------------------------------- the attack


def reconstruction_attack(encoder: LoadedEncoder, task: str, role: str, device: torch.device | str,
                          out_dir: Path | str, seed: int = 0, settings: DecoderSettings | None = None,
                          progress: bool = False) -> dict[str, Any]:
    """Train a decoder that inverts ``encoder`` on ``task``'s training split, score its test
    reconstructions, and draw them in ``out_dir/reconstruction_<task>.png``.

    The encoder's data (a learned run's own splits) and its ``[verify]`` settings are used:
    ``verify.views`` augmented views of each training image, and the Identity attacker's protocol.
    Returns a record with the keys of :func:`~privenc.verification.attacker_record` (attacker
    ``"reconstruction"``; validation and test scores are the Identity attacker's on the
    reconstructed images, its learning rate, iterations and saturation; ``saturated`` only when
    the decoder stopped by patience too) plus ``psnr``, ``ssim``, ``baseline_psnr``,
    ``baseline_ssim`` (the mean training image), the decoder's validation MSEs (in [-1, 1])
    and iterations, the Identity attacker's own balanced accuracy on raw images
    (``raw_val_bacc``, ``raw_test_bacc``) for comparison, and ``figure`` (the PNG's name in
    ``out_dir``). Writes nothing else: the caller keeps the record.
    """
    started = time.time()
    settings = settings or DecoderSettings()
    settings.check()
    torch_device = resolve_device(device) if isinstance(device, str) else device
    out_dir = Path(out_dir)
    ensure_writable(out_dir)  # the figure is written at the end: fail before the work, not after
    snapshot = freeze(encoder.module)
    verify = encoder.config.verify
    label = f"{encoder.name}/{task}/reconstruction"

    # the encoder's inputs and outputs, seeded as verification seeds its encodings
    data = prepare(encoder.config.data, [task], run_dir=encoder.run_dir)
    torch.manual_seed(encoder.config.data.seed)
    pairs = encode_pairs(encoder.module, data, verify.views, verify.batch_size, torch_device, progress)

    # (1) the decoder: encoding -> the image the encoder saw
    torch.manual_seed(seed)
    decoder = Decoder(tuple(pairs.encodings["train"].shape[1:]), data.config.image_size, settings.width)
    decoded = fit_decoder(decoder, pairs, settings, seed, torch_device, progress, label=f"{label}/decoder")
    reconstructed = {split: decode(decoder, pairs.encodings[split], torch_device) for split in ("val", "test")}
    mean_image = pairs.images["train"].mean(0, keepdim=True)                           # (1, 3, S, S)
    baseline_val_mse = float(F.mse_loss(mean_image.expand_as(pairs.images["val"]), pairs.images["val"]))
    scores = image_scores(reconstructed["test"], pairs.images["test"])
    baseline = image_scores(mean_image.expand_as(pairs.images["test"]), pairs.images["test"])

    # (2) the Identity attacker: trained and chosen on raw images, applied to the reconstructions
    raw = pairs.raw()
    classifier, fitted = identity_attacker(raw, encoder.config, seed, torch_device, progress,
                                           label=f"{label}/identity attacker")
    val = score_split(classifier, reconstructed["val"], raw.y["val"], torch_device)
    test = score_split(classifier, reconstructed["test"], raw.y["test"], torch_device)
    assert_unchanged(encoder.module, snapshot, encoder.name)

    figure = reconstruction_figure(pairs, reconstructed["test"], encoder, task, scores, baseline,
                                   out_dir / f"reconstruction_{task.replace('/', '-')}.png")
    seconds = round(time.time() - started, 2)
    result = AttackerResult("reconstruction", seed, verify.lr_raw, fitted.iters, fitted.saturated and decoded.saturated,
                            fitted.lr_dropped_at, val.acc, test.acc, test.ce, val.acc, test.acc, [], seconds,
                            val_bacc_best=val.bacc, test_bacc_best=test.bacc,
                            test_bacc_ci95=bootstrap_balanced_accuracy(test.predictions, raw.y["test"]),
                            val_bacc_final=val.bacc, test_bacc_final=test.bacc)
    record = {
        **attacker_record(encoder, task, role, raw, verify.views, result),
        "psnr": scores["psnr"], "ssim": scores["ssim"],
        "baseline_psnr": baseline["psnr"], "baseline_ssim": baseline["ssim"],
        "decoder_iters": decoded.iters, "decoder_saturated": decoded.saturated,
        "decoder_val_mse_initial": decoded.val_mse_initial, "decoder_val_mse_best": decoded.val_mse_best,
        "baseline_val_mse": baseline_val_mse, "decoder_curve": decoded.curve, "decoder": asdict(settings),
        "raw_val_bacc": fitted.val_bacc_best, "raw_test_bacc": fitted.test_bacc_best,
        "figure": figure.name,
    }
    log.info("%s: PSNR %.2f dB, SSIM %.3f (mean image %.2f dB, %.3f); Identity attacker on reconstructions: "
             "test balanced acc %.3f [%.3f, %.3f] (%.3f on raw images); decoder %d iterations%s",
             label, scores["psnr"], scores["ssim"], baseline["psnr"], baseline["ssim"], test.bacc,
             *result.test_bacc_ci95, fitted.test_bacc_best, decoded.iters,
             "" if decoded.saturated else " (NOT saturated)")
    return record


# --------------------------------------------------------------------------- the figure


def reconstruction_figure(pairs: Pairs, reconstructions: torch.Tensor, encoder: LoadedEncoder, task: str,
                          scores: dict[str, float], baseline: dict[str, float], path: Path,
                          count: int = FIGURE_IMAGES, reference: int = 256) -> Path:
    """Rows of test originals, their encodings and their reconstructions. Encodings that are
    images (Identity, Blur) are shown as pixels; others as their first three channels (one or
    two repeated to three), equalized over up to ``reference`` test encodings as in Figure 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encodings = pairs.encodings["test"][:reference].numpy()
    encodings = encodings[:, [min(c, encodings.shape[1] - 1) for c in range(3)]]     # (N, 3, h, w)
    shown = (encodings + 1) / 2 if encoder.kind in ("identity", "blur") else equalize(encodings)
    rows = [("original", (pairs.images["test"].numpy() + 1) / 2), ("encoding", shown),
            ("reconstruction", (reconstructions.numpy() + 1) / 2)]
    count = min(count, len(reconstructions))
    fig, axes = plt.subplots(len(rows), count, figsize=(1.3 * count, 1.5 * len(rows) + 0.4), squeeze=False)
    for row, (title, array) in enumerate(rows):
        for col in range(count):
            ax = axes[row, col]
            ax.imshow(np.clip(array[col].transpose(1, 2, 0), 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(title, fontsize=7)
    fig.suptitle(f"{encoder.name} / {task}: reconstruction PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.3f}\n"
                 f"(mean training image: {baseline['psnr']:.1f} dB, {baseline['ssim']:.3f})", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path
