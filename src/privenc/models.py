"""Networks: the learned encoder, its baselines, the classifiers and the attacker zoo.

The encoder (Sec. 3) maps a 3xSxS image to a small 3-channel encoding with convolutions and
spatial pooling only, each convolution followed by a per-location batch norm
(:mod:`privenc.norms`), the last one without affine parameters: the variance constraint.

Widths and the exact layer layout of Figure 2 are not recoverable from the paper; our
reconstruction (3x3 convolutions and three 2x2 max-pools, 224 -> 28, receptive field 112:
the ``paper`` preset) is one setting of the configuration, and everything here is built from
:class:`~privenc.config.EncoderConfig` / :class:`~privenc.config.ClassifierConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from privenc.config import ATTACKERS, ClassifierConfig, EncoderConfig
from privenc.norms import GlobalBatchNorm2d, PerLocationBatchNorm, make_norm

ENCODER_KINDS = ("learned", "identity", "blur")
"""What :func:`build_encoder` can build: the learned encoder and the paper's two baselines."""

# --------------------------------------------------------------------------- the encoder


def encoder_output_size(cfg: EncoderConfig, image_size: int) -> int:
    """Side of the encoding: one 2x2/stride-2 pool after every stage but the last."""
    factor = 2 ** (len(cfg.stages) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(
            f"image_size {image_size} must be divisible by 2**(len(encoder.stages) - 1) = {factor} "
            f"(encoder.stages = {cfg.stages})"
        )
    return image_size // factor


def _encoder_geometry(cfg: EncoderConfig) -> list[tuple[int, int]]:
    """(kernel, stride) of every spatial layer of the encoder, in order."""
    layers: list[tuple[int, int]] = []
    for i, widths in enumerate(cfg.stages):
        layers += [(cfg.kernel_size, 1)] * len(widths)
        if i < len(cfg.stages) - 1:
            layers.append((2, 2))
    layers.append((cfg.final_kernel_size, 1))
    return layers


def _receptive_field_of(layers: Iterable[tuple[int, int]]) -> int:
    """Receptive field of a chain of (kernel, stride) layers: each adds (k-1) * jump."""
    rf, jump = 1, 1
    for kernel, stride in layers:
        rf += (kernel - 1) * jump
        jump *= stride
    return rf


def receptive_field(cfg: EncoderConfig) -> int:
    """Side of the input window that one encoding element sees (Sec. 3: 112 at 224 -> 28).

    The paper's stated receptive field is what the reconstructed architecture (the ``paper``
    preset) was fitted to; this lets tests and docs check a config against it without building a model.
    """
    return _receptive_field_of(_encoder_geometry(cfg))


def _conv(cin: int, cout: int, kernel: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)


class Encoder(nn.Module):
    """The learned privacy-preserving encoder (Sec. 3).

    Per stage, for each width: bias-free conv ('same' zero padding) + ``make_norm(cfg.norm)``
    + ReLU; a 2x2 pool (``cfg.pool``) between stages; then a bias-free conv to
    ``cfg.out_channels``, a per-location BN with no scale and no bias, and tanh. Convs carry
    no bias because the following normalization removes it anyway, and with ``norm = "none"``
    a bias would be an easy way to output constants. The output normalization is applied
    whatever ``cfg.norm`` says: it *is* the generic variance constraint (every element zero
    mean, unit variance over the data), not an architectural option.
    """

    def __init__(self, cfg: EncoderConfig, image_size: int, in_channels: int = 3) -> None:
        super().__init__()
        out_size = encoder_output_size(cfg, image_size)
        self.image_size = image_size
        self.in_channels = in_channels
        self._output_shape = (cfg.out_channels, out_size, out_size)

        layers: list[nn.Module] = []
        cin, size = in_channels, image_size
        for i, widths in enumerate(cfg.stages):
            for width in widths:
                layers += [
                    _conv(cin, width, cfg.kernel_size, bias=False),
                    make_norm(cfg.norm, width, size, size),
                    # Not in place: a per-location BN's output is a view of the kernel's
                    # (B, C*H*W) result, and autograd would turn an in-place ReLU on it into
                    # strided copies of the whole map (a measured slowdown: docs/performance.md).
                    nn.ReLU(),
                ]
                cin = width
            if i < len(cfg.stages) - 1:
                layers.append(nn.MaxPool2d(2, 2) if cfg.pool == "max" else nn.AvgPool2d(2, 2))
                size //= 2
        layers += [
            _conv(cin, cfg.out_channels, cfg.final_kernel_size, bias=False),
            PerLocationBatchNorm(cfg.out_channels, size, size, scale=False, bias=False),
            nn.Tanh(),
        ]
        self.layers = nn.Sequential(*layers)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one encoding."""
        return self._output_shape

    @property
    def receptive_field(self) -> int:
        """Receptive field measured on the built layers (see :func:`receptive_field`)."""
        geometry = []
        for module in self.layers:
            if isinstance(module, nn.Conv2d):
                geometry.append((module.kernel_size[0], module.stride[0]))
            elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
                geometry.append((_as_int(module.kernel_size), _as_int(module.stride)))
        return _receptive_field_of(geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) float images -> (B, C, H, W) encodings in (-1, 1)."""
        return self.layers(x)


def _as_int(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else value[0]


# --------------------------------------------------------------------------- baseline encoders


class IdentityEncoder(nn.Module):
    """The 'Identity' baseline (Sec. 4.1): the raw image is the encoding."""

    def __init__(self, image_size: int, in_channels: int = 3) -> None:
        super().__init__()
        self._output_shape = (in_channels, image_size, image_size)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self._output_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class BlurEncoder(nn.Module):
    """The 'Naive Blur' baseline (Sec. 4.1), scaled to the input size.

    The paper box-filters a 224x224 image with a 120x120 window and downsamples by 8 to
    28x28. Here the window is ``round(120 / 224 * image_size)`` (made odd, so it is centred),
    applied at stride 1 with the zero padding excluded from the average (so borders are not
    darkened), then every ``f = image_size // out_size``-th pixel is kept, at offset ``f // 2``
    inside each f x f cell (plus half of any leftover margin) so the samples are centred.
    """

    def __init__(self, image_size: int, out_size: int, in_channels: int = 3) -> None:
        super().__init__()
        if not 1 <= out_size <= image_size:
            raise ValueError(f"BlurEncoder out_size must be in [1, image_size={image_size}], got {out_size}")
        width = max(1, round(120 / 224 * image_size))
        self.window = width if width % 2 == 1 else width + 1
        self.image_size = image_size
        self.factor = image_size // out_size
        self.offset = (image_size - self.factor * out_size) // 2 + self.factor // 2
        self._output_shape = (in_channels, out_size, out_size)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return self._output_shape

    def extra_repr(self) -> str:
        return f"window={self.window}, factor={self.factor}, offset={self.offset}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The box is separable even at the border (a clipped window is still a rectangle, and
        # its mean is the mean of row means), so filter rows, keep the sampled columns, then
        # filter those columns: 2w instead of w^2 operations per output.
        keep = slice(self.offset, self.offset + self.factor * (self._output_shape[1] - 1) + 1, self.factor)
        pad = self.window // 2
        rows = F.avg_pool2d(x, (1, self.window), stride=1, padding=(0, pad), count_include_pad=False)
        rows = rows[:, :, :, keep]  # (B, C, S, out)
        blurred = F.avg_pool2d(rows, (self.window, 1), stride=1, padding=(pad, 0), count_include_pad=False)
        return blurred[:, :, keep, :]  # (B, C, out, out)


def build_encoder(kind: str, cfg: EncoderConfig, image_size: int) -> nn.Module:
    """The learned encoder or a baseline; the blur baseline matches the learned output size."""
    if kind == "learned":
        return Encoder(cfg, image_size)
    if kind == "identity":
        return IdentityEncoder(image_size)
    if kind == "blur":
        return BlurEncoder(image_size, encoder_output_size(cfg, image_size))
    raise ValueError(f"unknown encoder kind {kind!r}; choose one of: {', '.join(ENCODER_KINDS)}")


# --------------------------------------------------------------------------- classifiers


class Classifier(nn.Module):
    """The private/desirable classifier on encodings (Sec. 3), also the 'paper' attacker.

    Per stage, for each width: conv ('same' padding; bias only without BN) [+ BatchNorm2d]
    + ReLU; 2x2 max-pool between stages (skipped once the map is 1x1); then global average
    pooling and a linear layer. Binary tasks use two logits and cross-entropy. ``features`` /
    ``head`` are split as in timm.
    """

    def __init__(self, cfg: ClassifierConfig, in_channels: int, num_classes: int, input_size: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        layers: list[nn.Module] = []
        cin, size = in_channels, input_size
        for i, widths in enumerate(cfg.stages):
            if i > 0 and size > 1:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            for width in widths:
                layers.append(_conv(cin, width, cfg.kernel_size, bias=not cfg.batch_norm))
                if cfg.batch_norm:
                    layers.append(GlobalBatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) encodings -> (B, num_classes) logits."""
        return self.head(self.features(x))


def _mlp(in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.2) -> nn.Sequential:
    """Flatten, two hidden ReLU layers, logits. Light dropout because an MLP on a flattened
    encoding overfits quickly and verification trains it to saturation, keeping the best
    validation checkpoint; more would weaken the attacker."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def build_attacker(family: str, cfg: ClassifierConfig, in_channels: int, num_classes: int,
                   input_size: int) -> nn.Module:
    """A fresh attacker for verification (Sec. 4.1 trains the paper's classifier from scratch).

    Beyond the paper's single architecture, the zoo asks whether privacy holds against other
    capacities: ``paper`` (the adversarial-training classifier), ``wide`` (2x widths and one
    more conv per stage), ``mlp`` (flatten, 2 hidden layers of 512) and ``linear``.
    """
    if family == "paper":
        return Classifier(cfg, in_channels, num_classes, input_size)
    if family == "wide":
        stages = [[2 * w for w in widths] + [2 * widths[-1]] for widths in cfg.stages]
        return Classifier(dataclasses.replace(cfg, stages=stages), in_channels, num_classes, input_size)
    flat = in_channels * input_size * input_size
    if family == "mlp":
        return _mlp(flat, num_classes)
    if family == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))
    raise ValueError(f"unknown attacker family {family!r}; choose one of: {', '.join(ATTACKERS)}")
