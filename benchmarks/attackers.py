"""(c) Attacker training on cached encodings against re-encoding every step, and the cost of
verification when several attackers train at once.

Verification trains many attackers (families x seeds x tasks) against one frozen encoder, so
``privenc.verification`` encodes each task's images once (``verify.views`` augmented views of every
training image) and ``fit_classifier`` samples mini-batches of those encodings. The naive
alternative runs the frozen encoder on freshly decoded raw images at every step.

Several attackers at once, two ways on a CPU:
(i) one process per attacker with one thread each, against one process that uses every core
    for one attacker at a time;
(ii) K attackers of one family stacked into one vectorized model (``torch.func``:
    ``stack_module_state`` + ``vmap`` + ``functional_call``), one Adam over the stacked
    parameters (Adam is element-wise, so this is K independent Adams). Families without
    BatchNorm only (``mlp``, ``linear``): vmapped BatchNorm cannot update per-model running
    statistics in place.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader

from privenc.attackers import Encoded, encode_task, fit_classifier
from privenc.config import Config, VerifyConfig
from privenc.data import TaskData
from privenc.data.transforms import train_transform
from privenc.models import Encoder, build_attacker
from privenc.stream import BatchStream

from fixtures import JpegDataset, frozen_encoder
from measure import Row, compare, interleave

CPU = torch.device("cpu")


def encode(config: Config, data: TaskData, encoder: torch.nn.Module | None = None) -> Encoded:
    """The first task's encodings by ``encoder`` (default: the seeded random encoder of
    ``config``), as verification caches them (``verify.views`` train views)."""
    single = dataclasses.replace(data, tasks=data.tasks[:1], labels={s: v[:, :1] for s, v in data.labels.items()})
    return encode_task(encoder or frozen_encoder(config), single, config.verify.views, config.verify.batch_size, CPU)


def _settings(config: Config, iters: int) -> VerifyConfig:
    """Run exactly ``iters`` iterations: one evaluation at the end, no early stop."""
    return dataclasses.replace(config.verify, max_iters=iters, eval_every=iters, patience=10**6)


def _new_attacker(config: Config, encoded: Encoded, family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    x = encoded.x["train"]
    return build_attacker(family, config.classifier, x.shape[1], encoded.num_classes, x.shape[-1])


def fit_on_cache(config: Config, encoded: Encoded, family: str, seed: int, iters: int) -> int:
    """``fit_classifier`` as verification runs it (its final evaluations included)."""
    model = _new_attacker(config, encoded, family, seed)
    fit_classifier(model, encoded, _settings(config, iters), config.verify.lr, seed, CPU, family)
    return iters


class ReEncodingAttacker:
    """An attacker trained on encodings recomputed at every step from raw images: the batches
    come from ``batches`` (a JPEG DataLoader or the library's cached stream)."""

    def __init__(self, config: Config, encoded: Encoded, batches, family: str = "paper") -> None:
        self.encoder = frozen_encoder(config)
        self.model = _new_attacker(config, encoded, family, 0).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.verify.lr)
        self.batches = batches
        self._iterator = iter(batches)

    def _next(self):
        try:
            return next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.batches)
            return next(self._iterator)

    def iterations(self, count: int) -> int:
        for _ in range(count):
            images, labels = self._next()
            with torch.no_grad():
                encodings = self.encoder(images)
            loss = F.cross_entropy(self.model(encodings), labels[:, 0])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return count


def stand_in_encodings(config: Config, count: int) -> Encoded:
    """Random encodings of the encoder's output shape: an attacker's cost does not depend on
    the values, and encoding a paper-scale pool on a CPU would take minutes."""
    generator = torch.Generator().manual_seed(0)
    channels, size, _ = Encoder(config.encoder, config.data.image_size).output_shape
    x = {s: torch.randn(n, channels, size, size, generator=generator)
         for s, n in (("train", count), ("val", count // 4), ("test", count // 4))}
    y = {s: torch.randint(0, 2, (len(v),), generator=generator) for s, v in x.items()}
    return Encoded(x, y, 2)


def cached_vs_reencoding(label: str, config: Config, data: TaskData, encoded: Encoded, jpegs: list[Path],
                         repeats: int, cached_iters: int, naive_iters: int, family: str = "paper",
                         from_cache: bool = True, target: float = 20.0) -> list[Row]:
    """Iterations/s of one attacker: fit_classifier on cached encodings vs re-encoding raw
    images at every step (decoded with PIL; and, with ``from_cache``, read from the uint8 cache)."""
    batch = config.verify.batch_size
    jpeg_loader = DataLoader(JpegDataset(jpegs, data.labels["train"][:, :1], config.data.load_size,
                                         train_transform(config.data)), batch_size=batch, shuffle=True, drop_last=True)
    naive = ReEncodingAttacker(config, encoded, jpeg_loader, family)
    naive_name = "naive: re-encode each step, PIL decode per item"
    variants = {naive_name: lambda: naive.iterations(naive_iters)}
    if from_cache:
        single = dataclasses.replace(data, labels={s: v[:, :1] for s, v in data.labels.items()})
        cached_images = ReEncodingAttacker(config, encoded, BatchStream(single.dataset("train", augment=True), batch,
                                                                        seed=0), family)
        variants["re-encode each step, images from the uint8 cache"] = lambda: cached_images.iterations(naive_iters)
    library = "privenc: fit_classifier on cached encodings"
    variants[library] = lambda: fit_on_cache(config, encoded, family, 0, cached_iters)
    rates = interleave(variants, repeats)
    return compare(f"(c) attacker training, {label}, '{family}' attacker, batch {batch}", rates, naive_name,
                   "iterations/s", targets={library: target})


# --------------------------------------------------------------------------- several at once


_WORKER: dict = {}


def _init_worker(config: Config, encoded: Encoded) -> None:
    torch.set_num_threads(1)
    _WORKER.update(config=config, encoded=encoded)


def _worker_fit(job: tuple[str, int, int]) -> int:
    family, seed, iters = job
    return fit_on_cache(_WORKER["config"], _WORKER["encoded"], family, seed, iters)


def processes_vs_threads(config: Config, encoded: Encoded, repeats: int, iters: int, family: str = "paper",
                         cores: int = 2) -> list[Row]:
    """(i) ``cores`` attackers in ``cores`` one-thread processes vs one process with ``cores``
    threads (and with one thread) training them one after another."""
    threads_before = torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    jobs = [(family, seed, iters) for seed in range(cores)]

    def sequential(threads: int) -> int:
        torch.set_num_threads(threads)
        try:
            return sum(fit_on_cache(config, encoded, *job) for job in jobs)
        finally:
            torch.set_num_threads(threads_before)

    with context.Pool(cores, initializer=_init_worker, initargs=(config, encoded)) as pool:
        pool.map(_worker_fit, [(family, 0, 2)] * cores)  # start-up (imports) outside the timing
        base = f"1 process x {cores} threads, one attacker at a time"
        rates = interleave({
            base: lambda: sequential(cores),
            "1 process x 1 thread, one attacker at a time": lambda: sequential(1),
            f"{cores} processes x 1 thread, {cores} attackers at once": lambda: sum(pool.map(_worker_fit, jobs)),
        }, repeats)
    used = {base: cores, "1 process x 1 thread, one attacker at a time": 1}
    notes = {name: f"{statistics.median(r) / used.get(name, cores):,.1f} per core" for name, r in rates.items()}
    return compare(f"several attackers at once: processes ('{family}' attacker)", rates, base,
                   "attacker-iterations/s", notes=notes)


class VmappedAttackers:
    """K attackers of one family (no BatchNorm) trained as one vectorized model."""

    def __init__(self, config: Config, encoded: Encoded, family: str, count: int) -> None:
        models = [_new_attacker(config, encoded, family, seed) for seed in range(count)]
        self.params, self.buffers = stack_module_state(models)  # name -> (K, ...) leaf tensors
        base = copy.deepcopy(models[0]).to("meta")

        def call(params, buffers, x):
            return functional_call(base, (params, buffers), (x,))

        self.forward = vmap(call, randomness="different")  # dropout masks differ per attacker
        self.optimizer = torch.optim.Adam(self.params.values(), lr=config.verify.lr)
        self.x, self.y = encoded.x["train"], encoded.y["train"]
        self.count, self.batch = count, min(config.verify.batch_size, len(self.x))
        self.generator = torch.Generator().manual_seed(0)

    def iterations(self, steps: int) -> int:
        for _ in range(steps):
            index = torch.randint(len(self.x), (self.count, self.batch), generator=self.generator)  # (K, B)
            logits = self.forward(self.params, self.buffers, self.x[index])  # (K, B, classes)
            # Sum over attackers of each one's mean loss: attacker k's gradient is its own.
            loss = F.cross_entropy(logits.flatten(0, 1), self.y[index].flatten(), reduction="sum") / self.batch
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return steps * self.count


class PlainAttackers:
    """The same K attackers trained one after another, each with its own Adam."""

    def __init__(self, config: Config, encoded: Encoded, family: str, count: int) -> None:
        self.models = [_new_attacker(config, encoded, family, seed).train() for seed in range(count)]
        self.optimizers = [torch.optim.Adam(m.parameters(), lr=config.verify.lr) for m in self.models]
        self.x, self.y = encoded.x["train"], encoded.y["train"]
        self.batch = min(config.verify.batch_size, len(self.x))
        self.generator = torch.Generator().manual_seed(0)

    def iterations(self, steps: int) -> int:
        for model, optimizer in zip(self.models, self.optimizers):
            for _ in range(steps):
                index = torch.randint(len(self.x), (self.batch,), generator=self.generator)
                loss = F.cross_entropy(model(self.x[index]), self.y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return steps * len(self.models)


def vectorized(config: Config, encoded: Encoded, repeats: int, iters: int, family: str = "mlp",
               counts: tuple[int, ...] = (4, 16)) -> list[Row]:
    """(ii) attacker-iterations/s of K vmapped attackers vs the same K trained one by one."""
    threads = torch.get_num_threads()
    variants = {}
    for k in counts:
        plain, stacked = PlainAttackers(config, encoded, family, k), VmappedAttackers(config, encoded, family, k)
        variants[f"{k} '{family}' attackers one after another"] = lambda p=plain: p.iterations(iters)
        variants[f"{k} '{family}' attackers vmapped (torch.func)"] = lambda s=stacked: s.iterations(iters)
    rates = interleave(variants, repeats)
    rows = []
    for k in counts:
        base = f"{k} '{family}' attackers one after another"
        pair = {name: r for name, r in rates.items() if name.startswith(f"{k} '")}
        notes = {name: f"{statistics.median(r) / threads:,.1f} per core ({threads} threads)"
                 for name, r in pair.items()}
        rows += compare(f"several attackers at once: vectorized, K={k}", pair, base, "attacker-iterations/s",
                        notes=notes)
    return rows
