"""Library changes measured: the previous code, kept here as the baseline, against the
library's current code, interleaved.

1. ``PerLocationBatchNorm`` took its statistics with ``torch.var_mean(x, dim=0)``. On a CPU
   that reduction over the batch (outermost) dimension is several times slower than a mean
   followed by a mean of squared deviations, the same two-pass formula; the library now
   computes the latter, reuses the centred input for the output, and folds the scale into
   the (C, H, W) factor before touching the batch.
   Then (commit after 9b9a683) the single-process path became one call of the native batch
   norm kernel on the (B, C*H*W) view: per-location BN is BatchNorm1d over the flattened
   locations, and the fused kernel's forward and backward make fewer passes over the batch
   than the same formula in autograd operations (whose element-wise work was about a third of
   a demo training step on a CPU). Measured on the module alone (forward and backward, at the
   demo's and the paper's largest feature maps) and on the demo iteration, all three versions
   (in the iteration, the encoder's ReLUs are the current library's, not in place, for all
   three: only the normalization differs).
2. ``ImageDataset.__getitem__`` copied the image out of the memmap, then transposed HWC ->
   CHW with ``permute().contiguous()`` (a second copy, slow for uint8); it now makes one
   transposing copy with numpy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from privenc.config import Config
from privenc.data import ImageDataset, TaskData
from privenc.models import PerLocationBatchNorm, _from_nhwc, _same, _to_nhwc

from measure import Row, compare, interleave


class VarMeanPerLocationBatchNorm(PerLocationBatchNorm):
    """The forward of privenc 0.1.0 (commit 05b8d90), single process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.training:
            var, mean = torch.var_mean(xf, dim=0, unbiased=False)
            count = float(x.shape[0])
            with torch.no_grad():
                unbiased = var * (count / (count - 1.0))
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class TwoPassPerLocationBatchNorm(PerLocationBatchNorm):
    """The single-process forward of commit 9b9a683: the two passes in autograd operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        nhwc = x.shape[1] > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        view = _to_nhwc if nhwc else _same
        xf = view(xf)
        if self.training:
            mean = xf.mean(0)
            centred = xf - mean
            var = centred.square().mean(0)
            count = float(x.shape[0])
            with torch.no_grad():
                view(self.running_mean).lerp_(mean, self.momentum)
                view(self.running_var).lerp_(var * (count / (count - 1.0)), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            centred, var = xf - view(self.running_mean).contiguous(), view(self.running_var).contiguous()
        y = self._scale_centred(centred, var, view)  # unchanged since: the library's (its DDP path)
        return (_from_nhwc(y) if nhwc else y).to(x.dtype)


NORM_VERSIONS = {
    "first: torch.var_mean": VarMeanPerLocationBatchNorm,
    "previous: two passes in autograd ops": TwoPassPerLocationBatchNorm,
    "current: native batch_norm kernel on (B, C*H*W)": PerLocationBatchNorm,
}
NORM_BASELINE = "first: torch.var_mean"


def with_norm(module: torch.nn.Module, version: type) -> torch.nn.Module:
    for child in module.modules():
        if isinstance(child, PerLocationBatchNorm):
            child.__class__ = version  # same state, that version's forward
    return module


def per_location_norm(config: Config, repeats: int, iters: int) -> list[Row]:
    """Demo iterations/s (random images, so only the step is timed): previous vs current norm."""
    from privenc.adversarial import Players, classifier_step, encoder_step
    from privenc.models import Classifier, Encoder

    t, size = config.train, config.data.image_size

    def players(version: type) -> tuple[Players, torch.optim.Optimizer, torch.optim.Optimizer]:
        torch.manual_seed(t.seed)
        encoder = Encoder(config.encoder, size)
        channels, height, _ = encoder.output_shape
        made = Players(with_norm(encoder, version),
                       torch.nn.ModuleList([Classifier(config.classifier, channels, 2, height)]),
                       Classifier(config.classifier, channels, 2, height))
        return (made, torch.optim.Adam(made.classifier_parameters(), lr=t.classifier_lr),
                torch.optim.Adam(made.encoder.parameters(), lr=t.encoder_lr))

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(t.batch_size, 3, size, size, generator=generator)
    private = torch.randint(0, 2, (t.batch_size, 1), generator=generator)
    desirable = torch.randint(0, 2, (t.batch_size,), generator=generator)

    def run(setup) -> int:
        made, classifier_opt, encoder_opt = setup
        for _ in range(iters):
            classifier_step(made, classifier_opt, images, private, desirable)
            encoder_step(made, encoder_opt, images, private, desirable, t.encoder_loss, t.alpha)
        return iters

    made = {name: players(version) for name, version in NORM_VERSIONS.items()}
    rates = interleave({name: (lambda setup=setup: run(setup)) for name, setup in made.items()}, repeats)
    return compare("library change: per-location BN, demo iteration", rates, NORM_BASELINE, "iterations/s")


def per_location_norm_module(repeats: int, shapes: tuple[tuple[int, ...], ...], iters: int = 2) -> list[Row]:
    """Forward + backward of the module alone, each version, at each (B, C, H, W)."""
    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        modules = {name: version(*shape[1:], bias=False) for name, version in NORM_VERSIONS.items()}

        def run(module, x=x, grad=grad) -> int:  # bound now: ruff B023
            for _ in range(iters):
                module(x).backward(grad)
            return iters

        rates = interleave({name: (lambda m=m: run(m)) for name, m in modules.items()}, repeats)
        rows += compare(f"library change: per-location BN module, {tuple(shape)}", rates, NORM_BASELINE,
                        "forward+backward/s")
    return rows


class PermuteImageDataset(ImageDataset):
    """``ImageDataset.__getitem__`` of privenc 0.1.0: copy, then permute().contiguous()."""

    def __getitem__(self, k: int):
        image = torch.from_numpy(np.array(self.images[int(self.indices[k])])).permute(2, 0, 1).contiguous()
        return self.transform(image), torch.from_numpy(self.labels[k].copy())


def _as_is(image: torch.Tensor) -> torch.Tensor:
    return image


def dataset_item(data: TaskData, repeats: int, batch_size: int = 64) -> list[Row]:
    """Images/s of uint8 batches from the cache: previous vs current item copy."""
    indices = data.images.indices
    labels = np.zeros((len(indices), 1), dtype=np.int64)
    loaders = {"previous: np.array + permute().contiguous()":
               DataLoader(PermuteImageDataset(data.images, indices, labels, _as_is), batch_size=batch_size),
               "current: one numpy transposing copy":
               DataLoader(ImageDataset(data.images, indices, labels, _as_is), batch_size=batch_size)}

    def drain(loader) -> int:
        return sum(len(images) for images, _ in loader)

    rates = interleave({name: (lambda ld=loader: drain(ld)) for name, loader in loaders.items()}, repeats)
    return compare(f"library change: cache item copy, {data.config.load_size} px", rates,
                   "previous: np.array + permute().contiguous()", "images/s")
