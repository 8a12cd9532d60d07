"""Normalization layers of the encoder and the classifiers.

:class:`PerLocationBatchNorm` is the paper's layer (Sec. 3): batch normalization whose
statistics are taken separately for every (channel, y, x). Standard (per-channel) BN lets an
adversarially trained encoder collapse to a per-location constant (it can detect the zero
padding at the border); per-location statistics forbid that, and a final per-location BN
without affine parameters enforces the "variance constraint": every output element has zero
mean and unit variance over the data. Under torch.distributed every batch norm here
all-reduces its statistics, so the global batch is normalized as one process would normalize
it. :func:`make_norm` builds the variants of the normalization ablation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from privenc.config import NORMS


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
        native kernel does it: forward and backward each one fused call, fewer passes over the
        batch than the same formula written out in autograd operations (docs/performance.md),
        with statistics as stable as two passes (tests: mean 100, std 0.01 in float32)."""
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


def output_variance(encodings: torch.Tensor, pre_tanh: bool = False) -> dict[str, float]:
    """Collapse diagnostics of an encoder's outputs (Sec. 4.2) over a set of images: the
    variance over the images of each pre-tanh output element, which the variance constraint
    asks to be 1. A collapsed element has ~0 (below 1e-4); below 0.5 it has lost half.

    Beside it the *spread* of each element: the variance a normal distribution with the same
    interquartile range would have, ((q75 - q25) / 1.349)^2. Unit variance can be met by an
    element that is one constant for nearly every image and far off for a rare few (the
    variance-only encoders of docs/results.md, 2026-12-01: variance 1, spread ~0): the spread
    sees that collapse, the variance does not. On well-spread outputs the two agree (0.93-0.99
    against 1.0 on lfw-faces encoders).

    ``encodings`` (N, ...) are the encoder's tanh outputs, or with ``pre_tanh`` the values the
    tanh receives. From tanh outputs, atanh recovers the normalized values, clamped so that a
    saturated element stays finite: a value beyond about +-7 reads as 7.25, so elements with
    rare large values read with less variance than they have (docs/results.md: 0.94 against
    1.15 measured directly on real photos; on outputs that keep their variance in rare images,
    0.50 against 0.95); the fractions below the thresholds barely move on well-spread outputs, and
    the spread, read from the middle half of the images, not at all."""
    if pre_tanh:
        values = encodings.float().flatten(1)
    else:
        values = torch.atanh(encodings.float().clamp(-1 + 1e-6, 1 - 1e-6)).flatten(1)
    variance = values.var(dim=0)
    spread = _interquartile_spread(values)
    return {"collapse_zero_var_frac": float((variance < 1e-4).float().mean()),
            "collapse_low_var_frac": float((variance < 0.5).float().mean()),
            "output_var_mean": float(variance.mean()),
            "collapse_zero_spread_frac": float((spread < 1e-4).float().mean()),
            "collapse_low_spread_frac": float((spread < 0.5).float().mean()),
            "output_spread_mean": float(spread.mean())}


def _interquartile_spread(values: torch.Tensor) -> torch.Tensor:
    """((q75 - q25) / 1.349)^2 over dim 0 of (N, D) ``values``: a normal distribution's variance.
    Nearest-rank quartiles by kthvalue (torch.quantile refuses inputs above 2^24 elements,
    which verification's encodings of a large test split reach)."""
    n = values.shape[0]
    if n < 2:
        return torch.full(values.shape[1:], float("nan"))
    low = values.kthvalue(max(1, math.ceil(0.25 * n)), dim=0).values
    high = values.kthvalue(max(1, math.ceil(0.75 * n)), dim=0).values
    return ((high - low) / 1.3489795).square()


class _Reached(Exception):
    """Raised by recalibrate's hook once the layer being measured has seen its input: the
    layers after it need not run."""


@torch.no_grad()
def recalibrate(module: nn.Module, batches: Callable[[], Iterable[torch.Tensor]]) -> int:
    """Re-estimate the running statistics of every batch norm in ``module`` on the inputs that
    ``batches()`` yields (called once per layer; each call must yield the same images), and
    return how many images a pass saw (0 when ``module`` has no batch norm).

    Layer by layer, in the order the forward pass reaches them, each layer's running mean and
    variance become the exact mean and variance of its inputs over the images, with every layer
    before it already recalibrated and in eval mode: the eval-mode module is then the one whose
    statistics fit these images, and the paper's output layer (per-location, no affine) gives
    every output element mean 0 and variance 1 over them. Training leaves running averages of
    *augmented* batches taken while the weights moved; images seen through the evaluation view
    have other statistics (docs/results.md: mean output variance 0.68-0.76 on unseen photos
    instead of 1). The module is left in eval mode.
    """
    norms = [m for m in module.modules() if isinstance(m, (PerLocationBatchNorm, nn.modules.batchnorm._BatchNorm))]
    module.eval()
    images = 0
    for norm in norms:
        per_location = isinstance(norm, PerLocationBatchNorm)
        moments: list[torch.Tensor] = []  # count, mean, sum of squared deviations (float64)

        def measure(_layer, inputs, per_location=per_location, moments=moments):
            x = inputs[0].float()
            dims = (0,) if per_location else tuple(d for d in range(x.dim()) if d != 1)
            count = torch.tensor(float(math.prod(x.shape[d] for d in dims)), dtype=torch.float64)
            # Two passes over the batch in float32 (stable within a batch), merged across batches
            # in float64: float64 copies of whole activation maps cost several times more.
            mean = x.mean(dim=dims)
            m2 = (x - mean.view(_stat_shape(x, dims))).square().sum(dim=dims).double()
            mean = mean.double()
            if not moments:
                moments.extend([count, mean, m2])
            else:  # Chan et al.'s pairwise update: stable whatever the number of batches
                n, old_mean, old_m2 = moments
                total = n + count
                delta = mean - old_mean
                moments[:] = [total, old_mean + delta * (count / total), old_m2 + m2 + delta**2 * (n * count / total)]
            raise _Reached

        handle = norm.register_forward_pre_hook(measure)
        try:
            images = 0
            for batch in batches():
                try:
                    module(batch)
                except _Reached:
                    pass
                images += batch.shape[0]
        finally:
            handle.remove()
        if not moments:
            raise ValueError("recalibrate: batches() yielded no images")
        n, mean, m2 = moments
        if n < 2:
            raise ValueError("recalibrate needs more than one value per statistic")
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_((m2 / (n - 1)).to(norm.running_var.dtype))  # unbiased, as training tracks it
    return images


def _stat_shape(x: torch.Tensor, dims: tuple[int, ...]) -> list[int]:
    """The shape that broadcasts a statistic over ``dims`` back against ``x``."""
    return [1 if d in dims else n for d, n in enumerate(x.shape)]
