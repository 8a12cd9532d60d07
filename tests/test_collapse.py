"""The variance constraint on unseen images (issue 17, point 4): collapse diagnostics, and the
shipped encoder's eval-mode normalization keeping every output element's variance near 1 on
images it did not see, once its running statistics have settled on the same distribution."""

import pytest
import torch

from privenc.config import load_config
from privenc.models import build_encoder
from privenc.norms import output_variance


def test_output_variance_counts_collapsed_and_low_variance_elements():
    torch.manual_seed(0)
    pre_tanh = torch.randn(4000, 10)
    pre_tanh[:, 0] = 0.3                  # constant: collapsed
    pre_tanh[:, 1] *= 0.5                 # variance 0.25: low, not collapsed
    stats = output_variance(torch.tanh(pre_tanh))
    assert stats["collapse_zero_var_frac"] == pytest.approx(0.1)
    assert stats["collapse_low_var_frac"] == pytest.approx(0.2)
    assert stats["output_var_mean"] == pytest.approx(0.8 + 0.025, abs=0.05)  # atanh undoes the squashing


def _images(n: int, generator: torch.Generator) -> torch.Tensor:
    # Location-dependent statistics, as photos have (sky on top): a normalization that does not
    # work per location would leave some output locations with little variance.
    images = torch.rand(n, 3, 16, 16, generator=generator)
    images[:, :, :8] = 0.5 + 0.02 * images[:, :, :8]
    return images


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", ["per_location", "per_location_affine", "batch"])
def test_eval_mode_encoder_keeps_unit_variance_on_unseen_images(norm, channels_last):
    config = load_config("demo", ["encoder.stages=[[4], [8]]", f"encoder.norm={norm}"])
    torch.manual_seed(0)
    encoder = build_encoder("learned", config.encoder, 16)
    if channels_last:  # the per-location layers write running statistics back through a view there
        encoder = encoder.to(memory_format=torch.channels_last)
    seen, unseen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    encoder.train()
    with torch.no_grad():
        for _ in range(100):  # running statistics settle (momentum 0.1: 0.9^100 < 1e-4)
            batch = _images(64, seen)
            encoder(batch.contiguous(memory_format=torch.channels_last) if channels_last else batch)
    encoder.eval()
    with torch.no_grad():
        stats = output_variance(encoder(_images(2000, unseen)))
    # The targets of issue 17 on unseen images: under 1% of elements ~0, under 10% below 0.5.
    assert stats["collapse_zero_var_frac"] < 0.01, stats
    assert stats["collapse_low_var_frac"] < 0.10, stats
    # Not exactly 1: in training mode the earlier layers normalize by batch statistics, in eval mode
    # by running ones, so the last layer sees slightly other inputs (0.84-0.95 measured here).
    assert stats["output_var_mean"] == pytest.approx(1.0, abs=0.25), stats

    with torch.no_grad():  # and the measure sees it when the statistics do not fit the images
        shifted = output_variance(encoder(0.05 * _images(2000, unseen)))
    assert shifted["collapse_low_var_frac"] > 0.5, shifted
