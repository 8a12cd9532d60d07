"""Networks: the learned encoder, its baselines, the classifiers and the attacker zoo.

The encoder (Sec. 3) maps a 3xSxS image to a small 3-channel encoding with convolutions and
spatial pooling only. Its one unusual layer is :class:`PerLocationBatchNorm`: batch
normalization whose statistics are taken separately for every (channel, y, x). Standard
(per-channel) BN lets an adversarially trained encoder collapse to a per-location constant
(it can detect the zero padding at the border); per-location statistics forbid that, and a
final per-location BN without affine parameters enforces the paper's generic-utility
"variance constraint": every output element has zero mean and unit variance over the data.

Widths and the exact layer layout of Figure 2 are not recoverable from the paper; the
reconstruction in ``shared/paper/NOTES.md`` (224 -> 28, receptive field 112) is one setting
of the configuration, and everything here is built from :class:`~privenc.config.EncoderConfig` /
:class:`~privenc.config.ClassifierConfig`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from privenc.config import ATTACKERS, NORMS, ClassifierConfig, EncoderConfig

ENCODER_KINDS = ("learned", "identity", "blur")
"""What :func:`build_encoder` can build: the learned encoder and the paper's two baselines."""

# --------------------------------------------------------------------------- normalization


class PerLocationBatchNorm(nn.Module):
    """Batch normalization with separate statistics for every (channel, y, x) (Sec. 3).

    Equivalent to ``BatchNorm1d`` on the flattened C*H*W vector: each element of the feature
    map is normalized by its own mean and variance over the batch. This is the paper's fix for
    collapse: with per-channel BN a bias-free encoder can still output a per-location
    constant, whereas here every location must vary over the data.

    ``scale`` / ``bias`` add learnable per-location affine parameters (the proposed encoder
    layer keeps the scale and drops the bias, Sec. 4.2; the output layer has neither).
    Running mean and (unbiased) variance are tracked like ``nn.BatchNorm2d`` and used in eval
    mode, so that an encoder in eval mode is a fixed function of each image, independent of
    the rest of the batch (needed to encode images once for verification).

    Under ``torch.distributed`` (world size > 1, training mode) the statistics are those of
    the global batch: per-location sums and counts, then sums of squared deviations from the
    global mean, are all-reduced with the autograd-aware collective, so forward values and
    input gradients match one process running the concatenated batch. The paper stresses
    that per-location BN needs a large batch (Sec. 4.1: 128); splitting it across GPUs must
    not shrink it.
    """

    def __init__(
        self,
        num_channels: int,
        height: int,
        width: int,
        scale: bool = True,
        bias: bool = True,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if min(num_channels, height, width) < 1:
            raise ValueError(f"PerLocationBatchNorm needs a positive shape, got {(num_channels, height, width)}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.shape = (num_channels, height, width)
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.shape)) if scale else None
        self.bias = nn.Parameter(torch.zeros(self.shape)) if bias else None
        self.register_buffer("running_mean", torch.zeros(self.shape))
        self.register_buffer("running_var", torch.ones(self.shape))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        c, h, w = self.shape
        return (f"{c}, {h}, {w}, scale={self.weight is not None}, bias={self.bias is not None}, "
                f"momentum={self.momentum}, eps={self.eps}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"PerLocationBatchNorm{self.shape} got input of shape {tuple(x.shape)}")
        if self.training and x.shape[0] < 2 and _world_size() == 1:
            raise ValueError("PerLocationBatchNorm needs more than one image per batch in training mode")
        # Statistics in at least float32 (bf16 under autocast is too coarse): variances of
        # near-constant locations are exactly what the collapse diagnostics look at.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # A channels-last input is worked on as the (B, H, W, C) tensor it is in memory, with the
        # (C, H, W) parameters and buffers viewed as (H, W, C): every operation below then reads
        # and writes contiguous memory (on a CPU, mixing the two layouts costs several times more).
        nhwc = x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        view = _to_nhwc if nhwc else _same
        if self.training and _world_size() > 1:
            y = self._global_batch_norm(view(xf), view)
        else:
            y = self._flat_batch_norm(view(xf), view)
        return (_from_nhwc(y) if nhwc else y).to(x.dtype)

    def _flat_batch_norm(self, x: torch.Tensor, view) -> torch.Tensor:
        """One process: per-location BN *is* BatchNorm1d over the flattened locations, so the
        native kernel does it: forward and backward each one fused call, 2-4x faster on a CPU than
        the same formula written out in autograd operations (benchmarks/changes.py), with
        statistics as stable as two passes (tests: mean 100, std 0.01 in float32)."""
        flat = x.reshape(x.shape[0], -1)

        def flat_param(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else view(t).reshape(-1)  # a view, or a small copy (NHWC)

        # Through the (H, W, C) view the flattened buffers are copies (unless the view happens
        # to be contiguous): decided from strides, not data pointers, so torch.compile traces it.
        copied = not view(self.running_mean).is_contiguous()
        mean, var = flat_param(self.running_mean), flat_param(self.running_var)
        y = F.batch_norm(flat, mean, var, flat_param(self.weight), flat_param(self.bias), self.training,
                         self.momentum, self.eps)
        if self.training:
            with torch.no_grad():
                # The kernel updated the running statistics in place (like nn.BatchNorm2d: the
                # unbiased variance is tracked, the biased one normalizes); copies are written back.
                if copied:
                    view(self.running_mean).copy_(mean.view(x.shape[1:]))
                    view(self.running_var).copy_(var.view(x.shape[1:]))
                self.num_batches_tracked.add_(1)
        return y.view(x.shape)

    def _global_batch_norm(self, x: torch.Tensor, view) -> torch.Tensor:
        """Training under ``torch.distributed``: the statistics of the global batch
        (:func:`_global_moments`)."""
        centred, mean, var, count = _global_moments(x, (0,))
        mean, var = mean[0], var[0]
        with torch.no_grad():
            unbiased = var * (count / (count - 1.0))
            view(self.running_mean).lerp_(mean, self.momentum)
            view(self.running_var).lerp_(unbiased, self.momentum)
            self.num_batches_tracked.add_(1)
        return self._scale_centred(centred, var, view)

    def _scale_centred(self, centred: torch.Tensor, var: torch.Tensor, view) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps) * weight + bias, the parameters seen through ``view``.
        The per-location factor first, so that the batch sees a single product."""
        factor = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            factor = factor * view(self.weight).contiguous()
        y = centred * factor
        if self.bias is not None:
            y = y + view(self.bias).contiguous()
        return y


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _to_nhwc(t: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> the (..., H, W, C) view of the same memory."""
    return t.movedim(-3, -1)


def _from_nhwc(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W), channels-last in memory."""
    return t.movedim(-1, 1)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_moments(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """``(x - mean, mean, var, count)`` over ``dims`` of the batch spread over every rank;
    mean and biased var keep those dims (size 1), count is the number of values per statistic.

    Two passes (as stable as the single-process kernels), rather than one all-reduce of sums
    and sums of squares: E[x^2] - E[x]^2 cancels in float32 exactly where it matters, at
    nearly constant locations (mean 12, std 0.1: outputs already off by 1e-4). The count rides
    along so that ranks may hold different local batch sizes. Differentiable: the backward of
    each all-reduce is a sum over ranks, so gradients are those of the global batch.
    """
    sums = x.sum(dims, keepdim=True)
    n = sums.numel()
    total = _differentiable_all_reduce(torch.cat([sums.flatten(), x.new_full((1,), float(x.numel() // n))]))
    count = total[-1].detach()
    mean = (total[:n] / count).view(sums.shape)
    centred = x - mean
    var = _differentiable_all_reduce(centred.square().sum(dims, keepdim=True).flatten()).view(sums.shape) / count
    return centred, mean, var, count


def _differentiable_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks whose backward is also a sum over ranks (gradients of the global batch).

    ``torch.distributed.nn.functional.all_reduce`` is the autograd-aware collective available
    since torch 1.x; recent releases mark it deprecated in favour of functional collectives
    that are differentiable only in newer versions, so the FutureWarning is silenced here.
    """
    # Imported here: only reached with an initialized process group, and some torch builds
    # lack torch.distributed altogether.
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, training under ``torch.distributed``, normalizes with the
    statistics of the global batch, as :class:`PerLocationBatchNorm` does: data-parallel
    training then computes what one process would on the whole batch. Unlike ``SyncBatchNorm``
    it works on every device and backend (gloo on CPUs included). One process, or eval mode:
    the native kernel, unchanged. Same parameters and buffers as ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world_size() > 1):
            return super().forward(x)
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"GlobalBatchNorm2d({self.num_features}) got input of shape {tuple(x.shape)}")
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        centred, mean, var, count = _global_moments(xf, (0, 2, 3))
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None = a cumulative average, as in nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.flatten().to(self.running_mean.dtype), factor)
                unbiased = var.flatten() * (count / (count - 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(1, -1, 1, 1)
        y = centred * scale
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


class BiasFreeBatchNorm2d(GlobalBatchNorm2d):
    """Standard per-channel BatchNorm2d with a learnable scale and no bias.

    The paper's normalization ablation (Sec. 4.2, "standard BN without biases"); global batch
    statistics under torchrun (:class:`GlobalBatchNorm2d`).
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)


def make_norm(name: str, channels: int, height: int, width: int) -> nn.Module:
    """The normalization after each hidden encoder conv, by name (the Sec. 4.2 ablation).

    ``none`` (collapses), ``batch`` (per-channel BN, scale only), ``per_location_affine``
    (per-location BN with scale and bias) and ``per_location`` (per-location BN with scale and
    no bias: the paper's proposal, the only variant that kept the variance constraint).
    """
    if name == "none":
        return nn.Identity()
    if name == "batch":
        return BiasFreeBatchNorm2d(channels)
    if name == "per_location_affine":
        return PerLocationBatchNorm(channels, height, width, scale=True, bias=True)
    if name == "per_location":
        return PerLocationBatchNorm(channels, height, width, scale=True, bias=False)
    raise ValueError(f"unknown normalization {name!r}; choose one of: {', '.join(NORMS)}")


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

    The paper's stated receptive field is what the reconstructed architecture in NOTES.md was
    fitted to; this lets tests and docs check a config against it without building a model.
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
                    # strided copies of the whole map (the encoder step 1.4x slower on a CPU).
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
        # filter those columns: 2w instead of w^2 operations per output (224 px: 120x faster).
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
