"""(a) One adversarial training iteration: the library's path against a naive baseline, and
the CPU thread settings.

An iteration is what ``privenc.training.train`` does per step after warm-up: draw a batch,
(1) a classifier step, draw another batch, (2) an encoder step. It consumes two batches, so
images/s = 2 x batch x iterations/s.

- library: batches from the uint8 memmap cache through ``BatchStream`` (the training loop's
  stream), then ``classifier_step`` and ``encoder_step``, exactly as training runs them.
- naive baseline (written here): a shuffled DataLoader over the JPEG files, decoded with PIL
  on every access (no cache), and the two steps written out plainly, eager float32.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from privenc import losses
from privenc.adversarial import classifier_step, encoder_step
from privenc.config import Config
from privenc.data import TaskData
from privenc.data.transforms import train_transform
from privenc.stream import BatchStream
from privenc.training import build_players, desirable_target

from fixtures import JpegDataset, demo_config, prepare_data
from measure import Row, compare, interleave


def _split_labels(labels: torch.Tensor, n_private: int, has_desirable: bool):
    """labels [B, T] -> private labels [B, P], desirable label [B] or None (as training does)."""
    return labels[:, :n_private], desirable_target(labels[:, n_private:]) if has_desirable else None


class LibraryTrainer:
    """The training loop's inner step, run on the library's own stream and steps."""

    def __init__(self, config: Config, data: TaskData, channels_last: bool | None = None) -> None:
        t = config.train
        torch.manual_seed(t.seed)
        self.config = config
        self.n_private = len(t.private)
        self.players = build_players(config, data, self.n_private)
        # None: what the config asks for (train.channels_last), as training would do
        if channels_last is None:
            channels_last = t.channels_last
        self.channels_last = channels_last
        if channels_last:
            for module in [self.players.encoder, *self.players.classifiers()]:
                module.to(memory_format=torch.channels_last)
        self.stream = BatchStream(data.dataset("train", augment=True), t.batch_size, seed=t.seed,
                                  num_workers=config.data.num_workers)
        self.classifier_opt = torch.optim.Adam(self.players.classifier_parameters(), lr=t.classifier_lr)
        self.encoder_opt = torch.optim.Adam(self.players.encoder.parameters(), lr=t.encoder_lr)

    def _batch(self):
        images, labels = next(self.stream)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        private, desirable = _split_labels(labels, self.n_private, self.players.desirable_classifier is not None)
        return images, private, desirable

    def iterations(self, count: int) -> int:
        t = self.config.train
        for _ in range(count):
            classifier_step(self.players, self.classifier_opt, *self._batch())
            encoder_step(self.players, self.encoder_opt, *self._batch(), t.encoder_loss, t.alpha)
        return count


class NaiveTrainer:
    """Baseline: PIL decode per item, no cache, eager float32, the two steps written plainly."""

    def __init__(self, config: Config, data: TaskData, jpegs: list[Path]) -> None:
        t = config.train
        torch.manual_seed(t.seed)
        self.config = config
        self.n_private = len(t.private)
        self.players = build_players(config, data, self.n_private)
        dataset = JpegDataset(jpegs, data.labels["train"], config.data.load_size, train_transform(config.data))
        self.loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=True)
        self._batches = iter(self.loader)
        self.classifier_opt = torch.optim.Adam(self.players.classifier_parameters(), lr=t.classifier_lr)
        self.encoder_opt = torch.optim.Adam(self.players.encoder.parameters(), lr=t.encoder_lr)

    def _batch(self):
        try:
            images, labels = next(self._batches)
        except StopIteration:
            self._batches = iter(self.loader)
            images, labels = next(self._batches)
        private, desirable = _split_labels(labels, self.n_private, self.players.desirable_classifier is not None)
        return images, private, desirable

    def _classifier_losses(self, encodings, private, desirable):
        total = sum(F.cross_entropy(c(encodings), private[:, k])
                    for k, c in enumerate(self.players.private_classifiers))
        if self.players.desirable_classifier is not None:
            total = total + F.cross_entropy(self.players.desirable_classifier(encodings), desirable)
        return total

    def iterations(self, count: int) -> int:
        t = self.config.train
        players = self.players
        for _ in range(count):
            # (1) classifiers on the detached encodings of one batch
            images, private, desirable = self._batch()
            with torch.no_grad():
                encodings = players.encoder(images)
            loss = self._classifier_losses(encodings, private, desirable)
            self.classifier_opt.zero_grad()
            loss.backward()
            self.classifier_opt.step()
            # (2) encoder: label flip against the classifiers + alpha * desirable CE, another batch
            # (the classifiers' gradients are computed too and cleared by the next step (1))
            images, private, desirable = self._batch()
            encodings = players.encoder(images)
            loss = sum(losses.encoder_private_loss(t.encoder_loss, c(encodings), private[:, k])
                       for k, c in enumerate(players.private_classifiers))
            if players.desirable_classifier is not None:
                loss = loss + t.alpha * F.cross_entropy(players.desirable_classifier(encodings), desirable)
            self.encoder_opt.zero_grad()
            loss.backward()
            self.encoder_opt.step()
        return count


def adversarial_iteration(label: str, config: Config, data: TaskData, jpegs: list[Path], repeats: int,
                          iters: int) -> list[Row]:
    """Images/s of one training iteration: naive baseline vs the library (in the memory format
    the preset asks for; benchmarks/layout.py compares the formats)."""
    images_per_iter = 2 * config.train.batch_size
    variants = {
        "naive: PIL decode per item, eager fp32": NaiveTrainer(config, data, jpegs),
        "privenc: uint8 cache + library steps": LibraryTrainer(config, data),
    }
    rates = interleave({name: (lambda tr=trainer: tr.iterations(iters) * images_per_iter)
                        for name, trainer in variants.items()}, repeats)
    return compare(f"(a) adversarial iteration, {label}", rates, next(iter(rates)), "images/s")


# --------------------------------------------------------------------------- thread settings


class _ThreadWorker:
    """A process with a fixed inter-op thread count (settable once, before any parallel work),
    OpenMP wait policy (read once, when OpenMP starts) and malloc setting (privenc/runtime.py)
    that times demo iterations on request, so settings can be interleaved across processes."""

    def __init__(self, interop: int, wait_policy: str | None, cache_dir: Path, batch_size: int,
                 malloc_tuning: bool = True) -> None:
        command = [sys.executable, __file__, "--thread-worker", "--interop", str(interop),
                   "--cache-dir", str(cache_dir), "--batch-size", str(batch_size)]
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        env["PRIVENC_MALLOC_TUNING"] = "1" if malloc_tuning else "0"
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect("ready")

    def _expect(self, prefix: str) -> str:
        line = self.process.stdout.readline().strip()  # type: ignore[union-attr]
        if not line.startswith(prefix):
            raise RuntimeError(f"thread worker said {line!r}, expected {prefix!r} (exit {self.process.poll()})")
        return line

    def run(self, intra: int, iters: int) -> int:
        self.start(intra, iters)
        self.finish()
        return iters

    def start(self, intra: int, iters: int) -> None:
        self.process.stdin.write(f"{intra} {iters}\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]

    def finish(self) -> float:
        """Seconds the worker took for the iterations it was asked for (timed in the worker)."""
        return float(self._expect("done").split()[1])

    def close(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=60)


DEFAULT_THREADS = "intra-op 2, inter-op 2, OpenMP wait policy unset"


def thread_settings(cache_dir: Path, repeats: int, iters: int, batch_size: int) -> list[Row]:
    """Demo iterations/s for intra-op threads 1 vs 2, inter-op threads 1 vs 2, and the OpenMP
    wait policy unset (threads spin at barriers) vs PASSIVE (they sleep).

    Each (inter-op, policy) setting lives in its own worker process; the parent asks them in
    turn, so all combinations are interleaved like in-process variants.
    """
    settings = [(2, None), (1, None), (2, "PASSIVE")]
    workers = {s: _ThreadWorker(s[0], s[1], cache_dir, batch_size) for s in settings}
    try:
        variants = {f"intra-op {intra}, inter-op {interop}, OpenMP wait policy {policy or 'unset'}":
                    (lambda w=w, intra=intra: w.run(intra, iters))
                    for intra in (2, 1) for (interop, policy), w in workers.items()}
        rates = interleave(variants, repeats, warmup=1)
    finally:
        for worker in workers.values():
            worker.close()
    return compare("CPU threads, demo iteration", rates, DEFAULT_THREADS, "iterations/s")


def allocator_settings(cache_dir: Path, repeats: int, iters: int, batch_size: int) -> list[Row]:
    """Demo iterations/s with glibc's malloc as it comes vs as privenc sets it (a large mmap
    threshold and trim threshold, so freed activations are reused instead of faulted in again;
    privenc/runtime.py).

    Measured the way the demo runs its processes: two single-thread worker processes, one per
    setting, timing the same iterations *at the same time* on the two cores (taking turns on
    one core would also compare them, but not under the memory traffic of a neighbour). Each
    round, each worker times its own iterations; the rounds give the medians."""
    workers = {tuned: _ThreadWorker(2, "PASSIVE", cache_dir, batch_size, malloc_tuning=tuned)
               for tuned in (False, True)}
    names = {False: "glibc defaults", True: "privenc: mmap threshold 32 MiB, trim threshold 1 GiB"}
    rates: dict[str, list[float]] = {name: [] for name in names.values()}
    try:
        for round_ in range(repeats + 1):  # the first round warms up (oneDNN caches, the heap)
            for worker in workers.values():
                worker.start(1, iters)
            seconds = {tuned: worker.finish() for tuned, worker in workers.items()}
            if round_:
                for tuned, elapsed in seconds.items():
                    rates[names[tuned]].append(iters / elapsed)
    finally:
        for worker in workers.values():
            worker.close()
    return compare("CPU allocator, demo iteration, 2 single-thread processes side by side", rates, names[False],
                   "iterations/s")


def _thread_worker_main(interop: int, cache_dir: Path, batch_size: int) -> None:
    from privenc.runtime import keep_freed_memory

    keep_freed_memory()  # unless PRIVENC_MALLOC_TUNING=0, as the parent chose
    torch.set_num_interop_threads(interop)
    config = demo_config(cache_dir, f"train.batch_size={batch_size}")
    trainer = LibraryTrainer(config, prepare_data(config))
    print("ready", flush=True)
    for line in sys.stdin:
        intra, iters = (int(x) for x in line.split())
        torch.set_num_threads(intra)
        started = time.perf_counter()
        trainer.iterations(iters)
        print(f"done {time.perf_counter() - started:.6f}", flush=True)


if __name__ == "__main__":  # the worker of thread_settings
    parser = argparse.ArgumentParser()
    parser.add_argument("--thread-worker", action="store_true", required=True)
    parser.add_argument("--interop", type=int, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    _thread_worker_main(args.interop, args.cache_dir, args.batch_size)
