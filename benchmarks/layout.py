"""CPU memory format: channels-last against the default NCHW, side by side.

``train.channels_last`` and ``verify.channels_last`` are off by default and on in the ``demo``
preset. These comparisons are what that choice rests on:

- the adversarial iteration (one classifier step + one encoder step, the library's stream and
  steps, ``training.LibraryTrainer``) with the networks and batches in either format, for the
  demo preset and for the paper preset (batch 2 on a CPU, where channels-last loses);
- ``fit_classifier`` with the 'paper' attacker on raw demo images (the Identity baseline, the
  most expensive verification cell of the demo) and on the demo encoder's encodings.

The per-location BatchNorm works on a channels-last input as the (B, H, W, C) tensor it is in
memory (``privenc.norms.PerLocationBatchNorm``); before that change channels-last was slower
than NCHW on a CPU, because every normalization op mixed the two layouts.
"""

from __future__ import annotations

import dataclasses

from privenc.attackers import Encoded
from privenc.config import Config
from privenc.data import TaskData
from privenc.models import IdentityEncoder

from attackers import encode, fit_on_cache
from measure import Row, compare, interleave
from training import LibraryTrainer

NCHW = "NCHW (channels_last = false, the default)"
CHANNELS_LAST = "channels-last (channels_last = true, the demo preset)"


def adversarial_iteration(label: str, config: Config, data: TaskData, repeats: int, iters: int) -> list[Row]:
    images_per_iter = 2 * config.train.batch_size
    trainers = {NCHW: LibraryTrainer(config, data, channels_last=False),
                CHANNELS_LAST: LibraryTrainer(config, data, channels_last=True)}
    rates = interleave({name: (lambda tr=trainer: tr.iterations(iters) * images_per_iter)
                        for name, trainer in trainers.items()}, repeats)
    return compare(f"CPU memory format: adversarial iteration, {label}", rates, NCHW, "images/s")


def raw_images(config: Config, data: TaskData) -> Encoded:
    """The first task's raw images as the Identity baseline's verification sees them."""
    return encode(config, data, IdentityEncoder(config.data.image_size))


def attacker(label: str, config: Config, encoded: Encoded, repeats: int, iters: int) -> list[Row]:
    configs = {name: dataclasses.replace(config, verify=dataclasses.replace(config.verify, channels_last=setting))
               for name, setting in ((NCHW, False), (CHANNELS_LAST, True))}
    rates = interleave({name: (lambda c=c: fit_on_cache(c, encoded, "paper", 0, iters)) for name, c in configs.items()},
                       repeats)
    size = encoded.x["train"].shape[-1]
    return compare(f"CPU memory format: 'paper' attacker, {label} ({size}x{size})", rates, NCHW, "iterations/s")
