"""Collapse diagnostics of trained encoders on the images of one split of their own data.

    python experiments/collapse.py runs/faces-variance-seed0 runs/faces-variance-seed1 --split test

For every run folder, its encoder file (eval mode, the normalization statistics it ships with)
encodes every image of the split once through the evaluation view, and the values its final
tanh receives are read directly. Printed per run, as fractions of output elements: variance
over the images below 1e-4 and below 0.5 (what the variance constraint holds to 1), the same
through atanh of the tanh outputs (what `verify` reads: atanh clips rare large values), the
interquartile *spread* below 1e-4 and below 0.5 and its mean (the variance a normal
distribution with the same interquartile range would have), and the median over elements of
the kurtosis over the images (3 for a normal distribution; about 1/p for an element that a
fraction p of the images carry). See README, "variance constraint", and docs/results.md,
2026-12-01, for what the columns told apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from privenc import runs
from privenc.data import prepare
from privenc.data.transforms import BatchTransform
from privenc.losses import kurtosis_over_batch
from privenc.norms import output_variance


def pre_tanh_outputs(run: Path, split: str, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-tanh values, tanh outputs) of ``run``'s encoder on every image of ``split``."""
    config = runs.read_config(run)
    encoder = runs.read_encoder(run).module.eval()
    data = prepare(config.data, list(config.train.private) + list(config.train.desirable), run_dir=run)
    view = BatchTransform(config.data, augment=False)
    loader = torch.utils.data.DataLoader(data.uint8_dataset(split), batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        pre = torch.cat([encoder.layers[:-1](view(images)) for images, _ in loader])
    return pre, torch.tanh(pre)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (with encoder.pt)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="the images to measure on (default: test, the unseen ones)")
    args = p.parse_args()
    missing = [str(run) for run in args.runs if not runs.is_finished(run)]
    if missing:
        p.error("not a finished run folder (no encoder.pt): " + ", ".join(missing))
    print("| run | images | var < 1e-4 | var < 0.5 | via atanh: var < 0.5 | spread < 1e-4 | spread < 0.5 "
          "| mean spread | median kurtosis |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        pre, out = pre_tanh_outputs(run, args.split)
        direct, via_atanh = output_variance(pre, pre_tanh=True), output_variance(out)
        kurtosis = kurtosis_over_batch(pre).median().item()
        print(f"| {run.name} | {len(pre)} | {direct['collapse_zero_var_frac']:.1%} "
              f"| {direct['collapse_low_var_frac']:.1%} | {via_atanh['collapse_low_var_frac']:.1%} "
              f"| {direct['collapse_zero_spread_frac']:.1%} | {direct['collapse_low_spread_frac']:.1%} "
              f"| {direct['output_spread_mean']:.3f} | {kurtosis:.1f} |", flush=True)


if __name__ == "__main__":
    main()
