"""Where this process runs: its device, and its place among torchrun's ranks.

``torchrun --nproc_per_node N -m privenc train ...`` sets RANK, LOCAL_RANK and WORLD_SIZE;
:func:`setup` then joins the process group (NCCL on GPUs, gloo on CPUs). Every rank takes its
share of each global batch; per-location batch norm all-reduces its statistics (norms.py), so
the global batch is normalized as one process would normalize it; only rank 0 writes. Every
module that asks which rank it is or which device to use asks here.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from privenc.adversarial import Players
from privenc.errors import ConfigError, TrainingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    joined: bool = False  # setup() initialized the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> World:
    """This process's place as torchrun's environment gives it (a world of one without torchrun),
    without joining any process group."""
    return World(int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1"))),
                 int(os.environ.get("LOCAL_RANK", "0")))


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; under torchrun, this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto (CUDA when present, else the CPU), cpu, cuda "
                          f"or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available")
    return device


def setup(device: str) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a world of one."""
    world = launched()
    if not world.distributed:
        return World()
    rank, local_rank, size = world.rank, world.local_rank, world.size
    use_cuda = (torch.cuda.is_available() and device in ("auto", "cuda")) or device.startswith("cuda")
    joined = not dist.is_initialized()
    if joined:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(rank, size, local_rank, joined)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


SLOW_WAIT = timedelta(days=7)
"""How long :func:`wait_for_all` waits for the last rank: far beyond any share of a grid."""


def wait_for_all(world: World, timeout: timedelta = SLOW_WAIT) -> None:
    """A barrier for ranks that arrive hours apart (after a sweep's grid, each rank has run its
    own share of cells). It runs on a gloo group of its own with a ``timeout`` far beyond the
    default group's (30 minutes with gloo, 10 with NCCL), which training keeps, so a rank that
    truly hangs in a training step still fails. A rank that dies makes torchrun stop the others."""
    if not world.distributed:
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def group_open() -> bool:
    """Whether this process is in a process group (then batch norms in training mode
    all-reduce their statistics with the other ranks: norms.py)."""
    return dist.is_available() and dist.is_initialized()


def teardown(world: World) -> None:
    """Leave the process group that :func:`setup` joined (one a caller joined is left to it).
    Every rank calls it after its last collective: a rank that exits with the group still open
    leaves gloo's threads and sockets to the interpreter's shutdown, racing the other ranks'
    exits (torchrun then reported a failed child after a finished run)."""
    if world.joined and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(world: World, obj):
    """Every rank's ``obj`` as a list on every rank (a list of one without distribution)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def from_main(world: World, obj):
    """Rank 0's ``obj`` on every rank: what the ranks must agree on (which runs a sweep still
    trains) is decided once, not read from a shared folder by each rank on its own."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(players: Players, world: World, device: torch.device) -> tuple[Players, Players]:
    """The players as each step sees them. Without distribution both are ``players``. Under
    torchrun, the classifier step goes through DistributedDataParallel wrappers of the
    classifiers (their gradients are averaged over ranks) and the encoder step through a wrapper
    of the encoder; each step calls the other side's plain module, which is fixed there."""
    if not world.distributed:
        return players, players
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    def wrap(module, broadcast_buffers=True):
        with warnings.catch_warnings():  # torch 2.14 renames broadcast_buffers; older torch lacks the new name
            warnings.simplefilter("ignore", FutureWarning)
            return DDP(module, device_ids=ids, broadcast_buffers=broadcast_buffers)

    classifier_side = Players(
        players.encoder,
        nn.ModuleList(wrap(c) for c in players.private_classifiers),
        wrap(players.desirable_classifier) if players.desirable_classifier is not None else None,
        players.private_ensemble,
    )
    # Per-location statistics are already global (all-reduced), so the encoder's running
    # buffers agree on every rank without a broadcast.
    encoder_side = Players(wrap(players.encoder, broadcast_buffers=False), players.private_classifiers,
                           players.desirable_classifier, players.private_ensemble)
    return classifier_side, encoder_side
