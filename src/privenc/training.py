"""Adversarial training of an encoder (Sec. 3 and 4.1 of the paper), read top to bottom:
config and data, models, optimizers, resume, then one loop whose phases are labelled.
What the run folder holds, and how it is read back, is :mod:`privenc.runs`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from privenc import checkpoint as ckpt
from privenc import distributed, runs
from privenc.adversarial import ACCURACY_SUFFIX, Players, classifier_step, encoder_step, evaluate
from privenc.atomic import ensure_writable
from privenc.config import Config, from_dict
from privenc.data import TaskData, prepare
from privenc.data.tasks import combine_tasks
from privenc.data.transforms import BatchTransform
from privenc.errors import ConfigError, TrainingError
from privenc.models import Classifier, Encoder
from privenc.norms import output_variance, recalibrate
from privenc.stream import BatchStream

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def desirable_target(columns: torch.Tensor) -> torch.Tensor:
    """The (N+1)-way desirable label from N per-task columns (Sec. 3): 0 = none of the
    desirable tasks, 1 + j = task j (first positive wins). One column passes through."""
    if columns.shape[1] == 1:
        return columns[:, 0]
    positive = columns > 0
    first = positive.float().argmax(dim=1)
    return torch.where(positive.any(dim=1), first + 1, torch.zeros_like(first))


def build_players(config: Config, data: TaskData, n_private: int) -> Players:
    """The encoder, ``train.private_ensemble`` private classifiers per private task (each drawn
    from the global RNG in turn, so independently initialized; the layout is Players'), and the
    desirable classifier."""
    encoder = Encoder(config.encoder, config.data.image_size)
    channels, height, _ = encoder.output_shape
    ensemble = config.train.private_ensemble
    private = nn.ModuleList(
        Classifier(config.classifier, channels, task.num_classes, height)
        for task in data.tasks[:n_private] for _ in range(ensemble)
    )
    desirable = None
    if len(data.tasks) > n_private:
        combined = combine_tasks(data.tasks[n_private:])
        desirable = Classifier(config.classifier, channels, combined.num_classes, height)
    return Players(encoder, private, desirable, ensemble)


def encoder_lr(config: Config, step: int) -> float:
    """Encoder LR after ``step`` total steps: multiplied by encoder_lr_decay every
    encoder_lr_decay_every adversarial iterations (paper: 0.1^(1/4) every 200k)."""
    t = config.train
    adversarial = max(0, step - t.warmup_iters)
    return t.encoder_lr * t.encoder_lr_decay ** (adversarial // t.encoder_lr_decay_every)


def member_to_reset(config: Config, step: int) -> int | None:
    """Which ensemble member is re-initialized before the iteration that starts after ``step``
    total steps, or None. With ``train.adversary_reset_every = N``, after every N encoder steps
    (N, 2N, ...) the next member in rotation: 0, 1, ..., K - 1, 0, ... in every private task.

    One member at a time, not all: the encoder then always faces K - 1 trained members (with
    K = 1 the one classifier is reset), rather than getting free steps against chance-level
    classifiers after each reset. A reset falls before the classifier step, so the fresh member
    gets its classifier_steps updates before the encoder plays against it.
    """
    t = config.train
    encoder_steps = step - t.warmup_iters
    if t.adversary_reset_every == 0 or encoder_steps <= 0 or encoder_steps % t.adversary_reset_every:
        return None
    return (encoder_steps // t.adversary_reset_every - 1) % t.private_ensemble


def reinitialize(module: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    """Fresh weights for ``module`` and no optimizer state for its parameters (Adam starts again
    from step 0 with zero moments, as for a new classifier).

    The weights are drawn on the CPU by the modules' own initializers (``reset_parameters``, as
    at construction) from a generator seeded with ``seed`` alone: the same on every device and
    every rank, repeatable after a resume, and no other random stream moves. They are copied
    into the existing parameters, so the optimizer and any data-parallel wrapper keep them.
    """
    fresh = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for layer in fresh.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
    module.load_state_dict(fresh.state_dict())
    for p in module.parameters():
        optimizer.state.pop(p, None)


def _reset_seed(config: Config, step: int, index: int) -> int:
    """The seed of a reset: from the run's seed, the step and the classifier's index."""
    return int(np.random.SeedSequence([config.train.seed, step, index]).generate_state(1)[0])


@dataclass
class TrainingState:
    """Everything a checkpoint saves and a resume restores, but the RNG states (gathered from
    every rank when a checkpoint is written): the players, both optimizers, the data stream's
    position, the step, and the running sums of the values to be logged next."""
    players: Players
    classifier_opt: torch.optim.Optimizer
    encoder_opt: torch.optim.Optimizer
    stream: BatchStream
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # of the logged values since the last log
    counts: dict[str, int] = field(default_factory=dict)  # steps in each sum (a step may lack a known label)

    def state_dict(self) -> dict[str, Any]:
        players = self.players
        return {
            "step": self.step,
            "encoder": players.encoder.state_dict(),
            "private_classifiers": players.private_classifiers.state_dict(),
            "desirable_classifier": players.desirable_classifier.state_dict() if players.desirable_classifier else {},
            "classifier_optimizer": self.classifier_opt.state_dict(),
            "encoder_optimizer": self.encoder_opt.state_dict(),
            "stream": self.stream.state_dict(),
            # a checkpoint between two logs: the next record must average the same steps after a resume
            "running_metrics": {"sums": dict(self.sums), "counts": dict(self.counts)},
        }

    def load_state_dict(self, payload: dict[str, Any], origin: str = "checkpoint") -> None:
        players = self.players
        ckpt.load_state(players.encoder, payload["encoder"], f"{origin}: encoder")
        ckpt.load_state(players.private_classifiers, payload["private_classifiers"], f"{origin}: private classifiers")
        if players.desirable_classifier is not None:
            ckpt.load_state(players.desirable_classifier, payload["desirable_classifier"],
                            f"{origin}: desirable classifier")
        self.classifier_opt.load_state_dict(payload["classifier_optimizer"])
        self.encoder_opt.load_state_dict(payload["encoder_optimizer"])
        self.stream.load_state_dict(payload["stream"])
        self.step = int(payload["step"])
        running = payload.get("running_metrics", {"sums": {}, "counts": {}})
        self.sums = dict(running["sums"])
        # checkpoints of earlier versions kept one count for every value
        self.counts = dict(running.get("counts", {k: int(running.get("count", 0)) for k in self.sums}))

    def add(self, values: dict[str, float]) -> None:
        add_to_running_sums(self.sums, self.counts, values)

    def take_means(self) -> dict[str, float]:
        """The mean of each value since the last log; the sums start again."""
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return means


def train(config: Config, run_dir: Path | str, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) an encoder in ``run_dir``; returns the path of the final encoder."""
    if not config.train.private:  # checked before anything is written: a config without tasks leaves no run folder
        raise ConfigError("no private task: set train.private, e.g. --set train.private=street or "
                          "--set train.private=attribute:gender (`privenc data inspect SOURCE` lists a source's "
                          "categories and attributes)")
    world = distributed.setup(config.train.device)
    try:
        return _train(config, Path(run_dir), resume, progress, world)
    finally:
        # after every rank's last collective (the closing barrier), and on an error too: no
        # rank exits with the process group open (distributed.teardown says why)
        distributed.teardown(world)


def train_worker(config_dict: dict[str, Any], run_dir: str, threads: int) -> str:
    """One run trained (or resumed from its checkpoint) in a spawned process of a pool, as the
    demo and sweeps train several runs side by side: ``threads`` torch threads, no bar."""
    from privenc.runtime import keep_freed_memory

    keep_freed_memory()  # a spawned worker: the command line's setting is not inherited
    torch.set_num_threads(threads)
    path = Path(run_dir)
    train(from_dict(config_dict), path, resume=runs.has_checkpoint(path), progress=False)
    return run_dir


def _train(config: Config, run_dir: Path, resume: bool, progress: bool, world: distributed.World) -> Path:
    t = config.train
    device = distributed.resolve_device(t.device, world.local_rank if world.distributed else None)
    if world.is_main:
        ensure_writable(run_dir / "checkpoints")  # fail now, not at the first checkpoint
    if world.is_main and not resume:
        runs.write_config(config, run_dir)

    # ---- data: one pool per split, labels = one column per task (private first). Rank 0
    # prepares first (it may build the image cache), the other ranks then read what it wrote.
    specs = [*t.private, *t.desirable]
    if world.is_main:
        data = prepare(config.data, specs, run_dir=run_dir)
        data.write(run_dir)
    distributed.barrier(world)
    if not world.is_main:
        data = prepare(config.data, specs, run_dir=run_dir)
    n_private = len(t.private)
    seed_everything(t.seed)
    # The stream yields cached uint8 images; the random rescale + crop runs a batch at a time on
    # the training device (data/transforms.py: BatchTransform).
    augment = BatchTransform(config.data, augment=True)
    stream = BatchStream(data.uint8_dataset("train"), t.batch_size, seed=t.seed,
                         num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
                         rank=world.rank, world_size=world.size)
    val_batches = _validation_batches(data, t.batch_size, t.val_batches, config.data.seed) if world.is_main else []

    # ---- models and optimizers (identical initial weights on every rank: same seed)
    players = build_players(config, data, n_private)
    for module in [players.encoder, *players.classifiers()]:
        module.to(device)
        if t.channels_last:
            module.to(memory_format=torch.channels_last)
    classifier_side, encoder_side = distributed.data_parallel(players, world, device)
    if t.compile:
        classifier_side, encoder_side = compile_encoder(classifier_side, encoder_side)
    if world.distributed:
        torch.manual_seed(t.seed * 7919 + world.rank)  # augmentations differ between ranks

    def to_device(batch, transform=augment):
        return _to_device(batch, device, t.channels_last, n_private, players.desirable_classifier is not None,
                          transform)

    state = TrainingState(
        players,
        torch.optim.Adam(players.classifier_parameters(), lr=t.classifier_lr, betas=tuple(t.betas)),
        torch.optim.Adam(players.encoder.parameters(), lr=t.encoder_lr, betas=tuple(t.betas)),
        stream,
    )
    checkpoint_path, encoder_path = run_dir / runs.CHECKPOINT_FILE, run_dir / runs.ENCODER_FILE
    total = t.warmup_iters + t.iters
    if resume:
        _restore(checkpoint_path, state, world, run_dir)
        if state.step >= total and runs.encoder_written_at(encoder_path, state.step):
            log.info("%s is already complete (step %d of %d); nothing to do", run_dir, state.step, total)
            distributed.barrier(world)
            return encoder_path
        _say_resumed(run_dir, config, state.step, world)

    bar = tqdm(total=total, initial=state.step, disable=not (progress and world.is_main), desc="train", unit="it",
               dynamic_ncols=True)
    started = time.time()
    while state.step < total:
        adversarial = state.step >= t.warmup_iters

        # (0) adversary reset (train.adversary_reset_every): one ensemble member per private task
        # starts again from fresh weights and fresh Adam moments
        member = member_to_reset(config, state.step)
        if member is not None:
            for k in range(n_private):
                index = k * t.private_ensemble + member
                reinitialize(players.private_classifiers[index], state.classifier_opt,
                             _reset_seed(config, state.step, index))

        # (1) classifiers: cross-entropy on true labels, encoder fixed; classifier_steps batches
        # of their own before each encoder step (one a step during warm-up, which trains only them)
        for _ in range(t.classifier_steps if adversarial else 1):
            stats = classifier_step(classifier_side, state.classifier_opt, *to_device(next(stream)), t.amp)

        # (2) encoder: private term + alpha * desirable CE, classifiers fixed, a batch of its own
        if adversarial:
            for group in state.encoder_opt.param_groups:
                group["lr"] = encoder_lr(config, state.step)
            stats.update(encoder_step(encoder_side, state.encoder_opt, *to_device(next(stream)),
                                      t.encoder_loss, t.alpha, t.amp, t.kurtosis_limit))
        state.step += 1
        state.add(_finite(logged_values(stats), state, world, device, checkpoint_path))
        bar.update(1)

        # (3) log: running means since the last log, validation, collapse diagnostics
        if world.is_main and (state.step % t.log_every == 0 or state.step == total):
            _log(run_dir, config, state, [to_device(b, None) for b in val_batches], started, bar)

        # (4) checkpoint: the full state, atomically
        if state.step % t.checkpoint_every == 0 or state.step == total:
            _save_checkpoint(checkpoint_path, config, state, world)
    bar.close()

    if world.is_main:
        calibration = None
        if t.recalibrate_images:
            calibration = recalibrate_encoder(players.encoder, data, config, device,
                                              [to_device(b, None)[0] for b in val_batches])
        runs.save_encoder(encoder_path, config, players.encoder, state.step, calibration)
        log.info("encoder saved to %s", encoder_path)
    distributed.barrier(world)
    return encoder_path


def recalibrate_encoder(encoder: Encoder, data: TaskData, config: Config, device: torch.device,
                        val_images: list[torch.Tensor]) -> dict[str, float]:
    """Re-estimate the encoder's normalization statistics on ``train.recalibrate_images``
    training images (a random sample drawn with data.seed) through the evaluation view, the
    view verification and deployment encode (:func:`privenc.norms.recalibrate`); return the
    collapse diagnostics of the result on ``val_images`` (pre-tanh values, measured directly),
    with the sample's size."""
    t = config.train
    # uint8, read once: recalibrate passes over them once per layer
    cached = [images for images, _ in _seeded_sample(data.uint8_dataset("train"), t.recalibrate_images, 256,
                                                     config.data.seed)]
    view = BatchTransform(config.data, augment=False)

    def batches():
        for images in cached:
            x = view(images.to(device))
            yield x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    count = recalibrate(encoder, batches)
    with torch.no_grad():  # the values the tanh receives, measured directly (the Encoder ends in it)
        result = output_variance(torch.cat([encoder.layers[:-1](x) for x in val_images]), pre_tanh=True) \
            if val_images else {}
    result = {"images": count, **{f"val_{k}": round(v, 6) for k, v in result.items()}}
    log.info("normalization statistics re-estimated on %d training images (evaluation view); validation: "
             "%s", count, ", ".join(f"{k} {v:.4g}" for k, v in result.items() if k != "images"))
    return result


# --------------------------------------------------------------------------- helpers of the loop


def compile_encoder(*sides: Players) -> list[Players]:
    """Each side with its encoder (a plain module or its DDP wrapper) behind torch.compile, one
    compiled wrapper per distinct module. The wrappers share the module's parameters and buffers,
    so the optimizer, checkpoints and the encoder file keep seeing the plain module's names."""
    compiled: dict[int, nn.Module] = {}
    out = []
    for side in sides:
        encoder = side.encoder
        if id(encoder) not in compiled:
            compiled[id(encoder)] = torch.compile(encoder)
        out.append(dataclasses.replace(side, encoder=compiled[id(encoder)]))
    return out


def _to_device(batch, device: torch.device, channels_last: bool, n_private: int, has_desirable: bool,
               transform=None):
    """(images, labels[B, T]) -> (images, private labels [B, P], desirable label [B] or None),
    on the device; ``transform`` turns a uint8 batch into the float network input there."""
    images, labels = batch
    images = images.to(device, non_blocking=True)
    if transform is not None:
        images = transform(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(device, non_blocking=True)
    desirable = desirable_target(labels[:, n_private:]) if has_desirable else None
    return images, labels[:, :n_private], desirable


def _validation_batches(data: TaskData, batch_size: int, count: int, seed: int = 0) -> list:
    """A fixed sample of ``count`` validation batches (evaluation transform), drawn at random
    once (seeded): the split is stored task by task, category by category, so its first images
    would be the positives of the first tasks only and every within-training accuracy would be
    measured on a slice unlike the data."""
    dataset = data.dataset("val", augment=False)
    if len(dataset) == 0:
        raise TrainingError("the validation split is empty: adjust data.split")
    return list(_seeded_sample(dataset, count * batch_size, batch_size, seed))


def _seeded_sample(dataset, count: int, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Batches of ``count`` images of ``dataset`` (all, if it holds fewer) drawn at random once
    with ``seed``, in a fixed order."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order[:count].tolist()),
                                       batch_size=batch_size, shuffle=False)


def logged_values(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's statistics as floats, less the accuracies that are NaN because no image of the
    batch had a known label for that task (not an error: the step just says nothing of it)."""
    values = {k: float(v) for k, v in stats.items()}
    return {k: v for k, v in values.items() if not (k.endswith(ACCURACY_SUFFIX) and math.isnan(v))}


def add_to_running_sums(sums: dict[str, float], counts: dict[str, int], values: dict[str, float]) -> None:
    """Add one step's values; each logged mean is sums[k] / counts[k], over the steps that had k."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v
        counts[k] = counts.get(k, 0) + 1


def _finite(values: dict[str, float], state: TrainingState, world: distributed.World, device: torch.device,
            checkpoint_path: Path) -> dict[str, float]:
    """``values``, or a TrainingError that says which went non-finite, which weights are broken
    and where the last good checkpoint is. Every rank stops together, or the others would hang."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if world.distributed:
        flag = torch.tensor([float(bool(bad))], device=device)
        torch.distributed.all_reduce(flag)
        bad = bad or (["a loss on another rank"] if flag.item() else [])
    if not bad:
        return values
    players = state.players
    last = checkpoint_path if checkpoint_path.exists() else None
    broken = [name for name, module in (("encoder", players.encoder),
                                        ("private classifiers", players.private_classifiers),
                                        ("desirable classifier", players.desirable_classifier))
              if module is not None and not all(torch.isfinite(v).all() for v in module.state_dict().values()
                                                if v.is_floating_point())]
    raise TrainingError(
        f"non-finite {', '.join(bad)} at step {state.step}; training stopped. "
        + (f"Non-finite weights in: {', '.join(broken)}. " if broken else "")
        + (f"The last good checkpoint is {last} (step {_checkpoint_step(last)})." if last
           else "No checkpoint was written yet.")
    )


def _log(run_dir: Path, config: Config, state: TrainingState, val_batches: list, started: float, bar) -> None:
    """One metrics record: the running means since the last log, then validation accuracies and
    collapse diagnostics (adversarial.evaluate) on the fixed validation batches."""
    t = config.train
    record: dict[str, Any] = {
        "step": state.step,
        "phase": "warmup" if state.step <= t.warmup_iters else "adversarial",
        "encoder_lr": encoder_lr(config, state.step - 1) if state.step > t.warmup_iters else 0.0,
        "classifier_lr": t.classifier_lr,
    }
    record.update(state.take_means())
    record.update(evaluate(state.players, val_batches))
    record["elapsed_s"] = round(time.time() - started, 3)
    runs.append_metrics(run_dir / runs.METRICS_FILE, record)
    validation = {k: f"{v:.3f}" for k, v in record.items() if k.startswith("val_")}
    bar.set_postfix(validation)
    if bar.disable:  # no bar (--no-progress, a batch job): one log line per log step instead
        total = t.warmup_iters + t.iters
        log.info("step %d/%d (%s, %.0f s): %s", state.step, total, record["phase"], record["elapsed_s"],
                 ", ".join(f"{k} {v}" for k, v in validation.items()))


def _save_checkpoint(path: Path, config: Config, state: TrainingState, world: distributed.World) -> None:
    rng_states = distributed.gather_objects(world, ckpt.rng_state())  # a collective: every rank calls it
    if world.is_main:
        ckpt.save(path, {**state.state_dict(), "config": config.to_dict(), "rng": rng_states[0],
                         "rng_ranks": rng_states})


def _checkpoint_step(path: Path) -> int:
    return int(ckpt.load(path)["step"])


def _restore(path: Path, state: TrainingState, world: distributed.World, run_dir: Path) -> None:
    """Load the checkpoint into ``state`` and every rank's RNGs; drop what was logged or left
    half-written after it."""
    payload = ckpt.load(path)
    state.load_state_dict(payload, str(path))
    states = payload.get("rng_ranks", [payload["rng"]])
    if len(states) != world.size:
        log.warning("%s was written by %d rank(s), resuming on %d: the random streams restart per rank "
                    "(weights, optimizers and data order are restored exactly)", path, len(states), world.size)
        torch.manual_seed(state.step * 7919 + world.rank)
    else:
        ckpt.set_rng_state(states[world.rank])
    if world.is_main:
        runs.truncate_metrics(run_dir / runs.METRICS_FILE, state.step)
        # A process killed while writing a checkpoint leaves its temporary file behind.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _say_resumed(run_dir: Path, config: Config, step: int, world: distributed.World) -> None:
    log.info("resumed %s at step %d", run_dir, step)
    if config.data.num_workers > 0 and world.is_main:
        log.warning("data.num_workers = %d: the resumed run is not bitwise identical to an uninterrupted "
                    "one (the loader workers restart with new random streams, so the augmentations after "
                    "step %d differ); use data.num_workers = 0 where that matters", config.data.num_workers, step)
