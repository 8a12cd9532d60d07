"""FLOPs of one adversarial training iteration, and what a GPU rate is worth against peak.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` over the library's own steps (one
classifier step and one encoder step, forward and backward) on the ``meta`` device: shapes
only, so the paper preset's 20 TFLOP iteration is counted in seconds on any CPU. The counter
counts 2 FLOPs per multiply-add of convolutions and matrix products (the convention of
vendors' peak numbers); element-wise work (normalization, ReLU, Adam) is not counted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from privenc.adversarial import Players, classifier_step, encoder_step
from privenc.config import Config
from privenc.models import Classifier, Encoder

BF16_DENSE_PEAK = {"H100 SXM": 989e12, "H200": 989e12}
"""Dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheets; without 2:4 sparsity). The H200
has the H100 SXM's tensor cores (more and faster memory): the same compute peak."""


class _NoOptimizer:
    """Stands in for Adam: the steps call zero_grad() and step(), which do no counted work."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def build_meta_players(config: Config) -> Players:
    """The players of ``config`` on the meta device; binary private tasks and an (N+1)-way
    desirable classifier, as ``privenc.training.build_players`` builds them for detection tasks."""
    t = config.train
    with torch.device("meta"):
        encoder = Encoder(config.encoder, config.data.image_size)
        channels, size, _ = encoder.output_shape
        private = nn.ModuleList(Classifier(config.classifier, channels, 2, size) for _ in t.private)
        desirable = (Classifier(config.classifier, channels, len(t.desirable) + 1 if len(t.desirable) > 1 else 2, size)
                     if t.desirable else None)
    return Players(encoder, private, desirable)


def iteration_flops(config: Config, batch_size: int | None = None) -> dict[str, float]:
    """FLOPs of the classifier step, the encoder step and their sum at ``batch_size``
    (default: the config's), and the images one iteration consumes (two batches)."""
    batch = batch_size or config.train.batch_size
    players = build_meta_players(config)
    size = config.data.image_size
    images = torch.empty(batch, 3, size, size, device="meta")
    private = torch.zeros(batch, len(config.train.private), dtype=torch.long, device="meta")
    desirable = torch.zeros(batch, dtype=torch.long, device="meta") if players.desirable_classifier else None
    with FlopCounterMode(display=False) as counter:
        classifier_step(players, _NoOptimizer(), images, private, desirable)  # type: ignore[arg-type]
    classifier = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        encoder_step(players, _NoOptimizer(), images, private, desirable,  # type: ignore[arg-type]
                     config.train.encoder_loss, config.train.alpha)
    encoder = counter.get_total_flops()
    return {"classifier_step": float(classifier), "encoder_step": float(encoder),
            "total": float(classifier + encoder), "images": float(2 * batch)}


def fraction_of_peak(iterations_per_s: float, flops_per_iteration: float, peak: float = 989e12) -> float:
    """Achieved FLOP/s as a fraction of ``peak`` (default: H100 SXM / H200 dense bf16)."""
    return iterations_per_s * flops_per_iteration / peak


def reencoding_bound(config: Config, family: str, batch_size: int) -> dict[str, float]:
    """FLOPs of one attacker step (forward and backward) and of encoding its batch, and the
    ratio (encode + step) / step: how much faster training on cached encodings can be than
    re-encoding every step when only FLOPs count (data loading would add to the re-encoding
    side). Small encoders and large attackers bound the gain well below 20x."""
    import torch.nn.functional as F

    from privenc.models import build_attacker

    size = config.data.image_size
    with torch.device("meta"):
        encoder = Encoder(config.encoder, size).eval()
        channels, height, _ = encoder.output_shape
        attacker = build_attacker(family, config.classifier, channels, 2, height)
        images = torch.empty(batch_size, 3, size, size)
        encodings = torch.empty(batch_size, channels, height, height)
        labels = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(images)
    encode = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(attacker(encodings), labels).backward()
    step = counter.get_total_flops()
    return {"encode": float(encode), "attacker_step": float(step), "bound": (encode + step) / step}
