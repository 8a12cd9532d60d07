"""Adversarial training of an encoder (Sec. 3 and 4.1 of the paper), read top to bottom:
config and data, models, optimizers, resume, then one loop whose phases are labelled.

Run folder layout (everything later commands need):
    config.toml, meta.json       the resolved config and provenance
    splits/, tasks.json          the data split and tasks (written by the data layer)
    metrics.jsonl                one JSON object per logged step
    checkpoints/last.pt          the latest full training state (resume from it)
    encoder.pt                   the final encoder, loadable on its own (verify, encode, export)
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from privenc import checkpoint as ckpt
from privenc import distributed
from privenc.adversarial import ACCURACY_SUFFIX, Players, classifier_step, encoder_step, evaluate
from privenc.config import Config, write_run_config
from privenc.data import TaskData, prepare
from privenc.data.tasks import combine_tasks
from privenc.data.transforms import BatchTransform
from privenc.models import Classifier, Encoder
from privenc.stream import BatchStream

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"
CHECKPOINT_FILE = "checkpoints/last.pt"
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, an unusable run folder)."""


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; under torchrun, this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        from privenc.config import ConfigError

        raise ConfigError(f"unknown device {name!r}; use auto (CUDA when present, else the CPU), cpu, cuda "
                          f"or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available")
    return device


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
    encoder = Encoder(config.encoder, config.data.image_size)
    channels, height, _ = encoder.output_shape
    private = nn.ModuleList(
        Classifier(config.classifier, channels, task.num_classes, height) for task in data.tasks[:n_private]
    )
    desirable = None
    if len(data.tasks) > n_private:
        combined = combine_tasks(data.tasks[n_private:])
        desirable = Classifier(config.classifier, channels, combined.num_classes, height)
    return Players(encoder, private, desirable)


def encoder_lr(config: Config, step: int) -> float:
    """Encoder LR after ``step`` total steps: multiplied by encoder_lr_decay every
    encoder_lr_decay_every adversarial iterations (paper: 0.1^(1/4) every 200k)."""
    t = config.train
    adversarial = max(0, step - t.warmup_iters)
    return t.encoder_lr * t.encoder_lr_decay ** (adversarial // t.encoder_lr_decay_every)


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) an encoder in ``run_dir``; returns the path of the final encoder."""
    world = distributed.setup(config.train.device)
    try:
        return _train(config, Path(run_dir), resume, progress, world)
    finally:
        # after every rank's last collective (the closing barrier), and on an error too: no
        # rank exits with the process group open (distributed.teardown says why)
        distributed.teardown(world)


def _train(config: Config, run_dir: Path, resume: bool, progress: bool, world: distributed.World) -> Path:
    t = config.train
    device = resolve_device(t.device, world.local_rank if world.distributed else None)
    if world.is_main:
        ckpt.ensure_writable(run_dir / "checkpoints")  # fail now, not at the first checkpoint
    if world.is_main and not resume:
        write_run_config(config, run_dir)

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
    classifier_players, encoder_players = _data_parallel(players, world, device)
    if world.distributed:
        torch.manual_seed(t.seed * 7919 + world.rank)  # augmentations differ between ranks

    def to_device(batch, transform=augment):
        return _to_device(batch, device, t.channels_last, n_private, players.desirable_classifier is not None,
                          transform)

    classifier_opt = torch.optim.Adam(players.classifier_parameters(), lr=t.classifier_lr, betas=tuple(t.betas))
    encoder_opt = torch.optim.Adam(players.encoder.parameters(), lr=t.encoder_lr, betas=tuple(t.betas))

    step = 0
    checkpoint_path = run_dir / CHECKPOINT_FILE
    total = t.warmup_iters + t.iters
    encoder_path = run_dir / ENCODER_FILE
    sums: dict[str, float] = {}  # running sums of the logged values since the last log
    counts: dict[str, int] = {}  # and how many steps each sums (a step may lack a known label)
    if resume:
        step, sums, counts = _restore(checkpoint_path, players, classifier_opt, encoder_opt, stream, world)
        if world.is_main:
            _truncate_metrics(run_dir / METRICS_FILE, step)
            # A process killed while writing a checkpoint leaves its temporary file behind.
            for stale in checkpoint_path.parent.glob(f".{checkpoint_path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        if step >= total and _encoder_written_at(encoder_path, step):
            log.info("%s is already complete (step %d of %d); nothing to do", run_dir, step, total)
            distributed.barrier(world)
            return encoder_path
        log.info("resumed %s at step %d", run_dir, step)
        if config.data.num_workers > 0 and world.is_main:
            log.warning("data.num_workers = %d: the resumed run is not bitwise identical to an uninterrupted "
                        "one (the loader workers restart with new random streams, so the augmentations after "
                        "step %d differ); use data.num_workers = 0 where that matters", config.data.num_workers, step)

    bar = tqdm(total=total, initial=step, disable=not (progress and world.is_main), desc="train", unit="it",
               dynamic_ncols=True)
    started = time.time()
    while step < total:
        images, private_labels, desirable_labels = to_device(next(stream))

        # (1) classifiers: cross-entropy on true labels, encoder fixed (warm-up: this step only);
        # classifier_steps of them, each on its own batch, before each encoder step
        stats = classifier_step(classifier_players, classifier_opt, images, private_labels, desirable_labels, t.amp)
        for _ in range(t.classifier_steps - 1 if step >= t.warmup_iters else 0):
            stats = classifier_step(classifier_players, classifier_opt, *to_device(next(stream)), t.amp)

        # (2) encoder: private term + alpha * desirable CE, classifiers fixed, a different batch
        if step >= t.warmup_iters:
            lr = encoder_lr(config, step)
            for group in encoder_opt.param_groups:
                group["lr"] = lr
            images, private_labels, desirable_labels = to_device(next(stream))
            stats.update(encoder_step(encoder_players, encoder_opt, images, private_labels, desirable_labels,
                                      t.encoder_loss, t.alpha, t.amp))
        step += 1

        values = logged_values(stats)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if world.distributed:  # every rank stops together, or the others would hang
            flag = torch.tensor([float(bool(bad))], device=device)
            torch.distributed.all_reduce(flag)
            bad = bad or (["a loss on another rank"] if flag.item() else [])
        if bad:
            last = checkpoint_path if checkpoint_path.exists() else None
            broken = [name for name, module in (("encoder", players.encoder),
                                                ("private classifiers", players.private_classifiers),
                                                ("desirable classifier", players.desirable_classifier))
                      if module is not None and not all(torch.isfinite(v).all() for v in module.state_dict().values()
                                                        if v.is_floating_point())]
            raise TrainingError(
                f"non-finite {', '.join(bad)} at step {step}; training stopped. "
                + (f"Non-finite weights in: {', '.join(broken)}. " if broken else "")
                + (f"The last good checkpoint is {last} (step {_checkpoint_step(last)})." if last
                   else "No checkpoint was written yet.")
            )
        add_to_running_sums(sums, counts, values)
        bar.update(1)

        # ---- logging: running means since the last log, validation, collapse diagnostics
        if world.is_main and (step % t.log_every == 0 or step == total):
            record: dict[str, Any] = {
                "step": step,
                "phase": "warmup" if step <= t.warmup_iters else "adversarial",
                "encoder_lr": encoder_lr(config, step - 1) if step > t.warmup_iters else 0.0,
                "classifier_lr": t.classifier_lr,
            }
            record.update({k: v / counts[k] for k, v in sums.items()})
            record.update(evaluate(players, [to_device(b, None) for b in val_batches]))
            record["elapsed_s"] = round(time.time() - started, 3)
            _append_metrics(run_dir / METRICS_FILE, record)
            validation = {k: f"{v:.3f}" for k, v in record.items() if k.startswith("val_")}
            bar.set_postfix(validation)
            if bar.disable:  # no bar (--no-progress, a batch job): one log line per log step instead
                log.info("step %d/%d (%s, %.0f s): %s", step, total, record["phase"], record["elapsed_s"],
                         ", ".join(f"{k} {v}" for k, v in validation.items()))
            sums, counts = {}, {}

        # ---- checkpoint: full state, atomically
        if step % t.checkpoint_every == 0 or step == total:
            _save_checkpoint(checkpoint_path, config, step, players, classifier_opt, encoder_opt, stream, world,
                             sums, counts)
    bar.close()

    if world.is_main:
        save_encoder(encoder_path, config, players.encoder, step)
        log.info("encoder saved to %s", encoder_path)
    distributed.barrier(world)
    return encoder_path


def _data_parallel(players: Players, world: distributed.World, device: torch.device) -> tuple[Players, Players]:
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
    )
    # Per-location statistics are already global (all-reduced), so the encoder's running
    # buffers agree on every rank without a broadcast.
    encoder_side = Players(wrap(players.encoder, broadcast_buffers=False), players.private_classifiers,
                           players.desirable_classifier)
    return classifier_side, encoder_side


# --------------------------------------------------------------------------- helpers of the loop


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
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    chosen = order[:count * batch_size].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, chosen), batch_size=batch_size,
                                         shuffle=False)
    return list(loader)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    try:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as err:
        raise OSError(err.errno, f"cannot append to {path}: {err.strerror or err}") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log. A last line cut short (the process was killed or the disk
    filled during an append) is dropped with a warning; a bad line before it is an error."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise TrainingError(f"{path}:{number}: not a JSON record; the metrics log is corrupt") from None
            log.warning("%s: dropping its last line, cut short by an interruption: %r", path, line[:80])
    return records


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from, so none appears twice."""
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    ckpt.atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


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


def _save_checkpoint(path: Path, config: Config, step: int, players: Players,
                     classifier_opt: torch.optim.Optimizer, encoder_opt: torch.optim.Optimizer,
                     stream: BatchStream, world: distributed.World, sums: dict[str, float],
                     counts: dict[str, int]) -> None:
    rng_states = distributed.gather_objects(world, ckpt.rng_state())  # a collective: every rank calls it
    if not world.is_main:
        return
    payload = {
        "step": step,
        "config": config.to_dict(),
        "encoder": players.encoder.state_dict(),
        "private_classifiers": players.private_classifiers.state_dict(),
        "desirable_classifier": players.desirable_classifier.state_dict() if players.desirable_classifier else {},
        "classifier_optimizer": classifier_opt.state_dict(),
        "encoder_optimizer": encoder_opt.state_dict(),
        "stream": stream.state_dict(),
        "rng": rng_states[0],
        "rng_ranks": rng_states,
        # a checkpoint between two logs: the next record must average the same steps after a resume
        "running_metrics": {"sums": dict(sums), "counts": dict(counts)},
    }
    ckpt.save(path, payload)


def _checkpoint_step(path: Path) -> int:
    return int(ckpt.load(path)["step"])


def _encoder_written_at(path: Path, step: int) -> bool:
    """Whether ``path`` is a readable final encoder of ``step`` (a run killed after its last
    checkpoint but before its encoder file was written still has to write it)."""
    try:
        return path.is_file() and int(ckpt.load(path).get("step", -1)) == step
    except ckpt.CheckpointError:
        return False


def _restore(path: Path, players: Players, classifier_opt: torch.optim.Optimizer,
             encoder_opt: torch.optim.Optimizer, stream: BatchStream,
             world: distributed.World) -> tuple[int, dict[str, float], dict[str, int]]:
    payload = ckpt.load(path)
    ckpt.load_state(players.encoder, payload["encoder"], f"{path}: encoder")
    ckpt.load_state(players.private_classifiers, payload["private_classifiers"], f"{path}: private classifiers")
    if players.desirable_classifier is not None:
        ckpt.load_state(players.desirable_classifier, payload["desirable_classifier"], f"{path}: desirable classifier")
    classifier_opt.load_state_dict(payload["classifier_optimizer"])
    encoder_opt.load_state_dict(payload["encoder_optimizer"])
    stream.load_state_dict(payload["stream"])
    states = payload.get("rng_ranks", [payload["rng"]])
    if len(states) != world.size:
        log.warning("%s was written by %d rank(s), resuming on %d: the random streams restart per rank "
                    "(weights, optimizers and data order are restored exactly)", path, len(states), world.size)
        torch.manual_seed(int(payload["step"]) * 7919 + world.rank)
    else:
        ckpt.set_rng_state(states[world.rank])
    running = payload.get("running_metrics", {"sums": {}, "counts": {}})
    sums = dict(running["sums"])
    # checkpoints of earlier versions kept one count for every value
    counts = running.get("counts", {k: int(running.get("count", 0)) for k in sums})
    return int(payload["step"]), sums, dict(counts)


# --------------------------------------------------------------------------- the final encoder


def save_encoder(path: Path, config: Config, encoder: nn.Module, step: int) -> None:
    """The encoder alone, with what is needed to rebuild it (its config and input size)."""
    ckpt.save(path, {
        "kind": "learned",
        "step": step,
        "encoder_config": config.to_dict()["encoder"],
        "image_size": config.data.image_size,
        "output_shape": list(encoder.output_shape),
        # Standard (contiguous) layout whatever train.channels_last was: the file is what
        # encode / export / other tools load.
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
    })


def load_encoder(run_or_file: Path, device: str | torch.device = "cpu") -> Encoder:
    """Load a trained encoder (strictly) from a run folder or an encoder file, in eval mode.
    Every way a file can be wrong becomes a CheckpointError that names it."""
    from privenc.config import ConfigError, EncoderConfig, build_section

    path = Path(run_or_file)
    if path.is_dir():
        path = path / ENCODER_FILE
    payload = ckpt.load(path, map_location=device)
    if payload.get("kind") != "learned":
        raise ckpt.CheckpointError(f"{path}: not an encoder file (kind={payload.get('kind')!r})")
    try:
        encoder_cfg = build_section("encoder", EncoderConfig, payload["encoder_config"])
        encoder = Encoder(encoder_cfg, int(payload["image_size"]))
    except KeyError as err:
        raise ckpt.CheckpointError(f"{path}: encoder file without {err}") from None
    except (ConfigError, ValueError, TypeError) as err:
        raise ckpt.CheckpointError(f"{path}: the encoder it describes cannot be built: {err}") from None
    ckpt.load_state(encoder, payload["state_dict"], f"{path}: encoder")
    bad = [key for key, value in payload["state_dict"].items()
           if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ckpt.CheckpointError(f"{path}: the encoder holds non-finite values (NaN or Inf) in "
                                   f"{', '.join(bad[:5])}; its encodings would be meaningless")
    return encoder.to(device).eval()
