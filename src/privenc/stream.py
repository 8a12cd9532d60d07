"""An endless, resumable stream of shuffled mini-batches.

Training needs to stop anywhere and resume exactly: the stream's position is two integers
(epoch, position in the epoch's permutation), and each epoch's permutation is a pure function
of (seed, epoch), so a checkpoint stores the position, not the data order itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


class BatchStream:
    """``next(stream)`` returns the next collated batch; the last partial batch of an epoch is
    dropped so every batch has ``batch_size`` items (per-location statistics need it). Under
    data parallelism ``batch_size`` is the global batch and each rank gets its share."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                 pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        if self.size < batch_size:
            raise ValueError(
                f"the training pool has {self.size} images, fewer than one batch of {batch_size}: "
                "lower the batch size or add data"
            )
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} is not divisible by the {world_size} ranks")
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def _start_epoch_iterator(self) -> None:
        order = self._permutation(self.epoch)
        last = self.size - self.batch_size
        # Every rank walks the same global batches and takes its own contiguous share of each.
        share = self.batch_size // self.world_size
        lo, hi = self.rank * share, (self.rank + 1) * share
        batches = [order[i:i + self.batch_size][lo:hi].tolist()
                   for i in range(self.position, last + 1, self.batch_size)]
        # A private generator: creating a DataLoader iterator draws a base seed, and drawing it
        # from the global RNG would make a resumed run diverge from an uninterrupted one.
        workers_seed = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + self.position)
        self._iterator = iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                         pin_memory=self.pin_memory, generator=workers_seed))

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self.position + self.batch_size > self.size:
            self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._start_epoch_iterator()
        batch = next(self._iterator)  # type: ignore[arg-type]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._iterator = int(state["epoch"]), int(state["position"]), None
