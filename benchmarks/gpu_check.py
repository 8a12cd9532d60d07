"""The GPU half of the performance targets, as one short script (meant to take under 5 minutes
on one H100; an estimate, not yet timed: no GPU has been lent to this project so far).

    python benchmarks/gpu_check.py                      # on a CUDA machine; writes $OUT/gpu.md if OUT is set
    python benchmarks/gpu_check.py --device cpu --quick # smoke run on a CPU: tiny sizes, no compile

It measures, for the paper preset (224x224, batch 128):
1. training iterations/s with eager float32 vs bf16 autocast vs + channels_last vs +
   torch.compile, each as a fraction of the dense bf16 peak (989 TFLOP/s on H100 SXM / H200)
   for the FLOPs of one iteration (benchmarks/flops.py);
2. loader throughput from a uint8 memmap cache (DataLoader workers, pinned memory), with the
   per-item CPU augmentation (train_transform, the per-image reference path) and with uint8
   batches augmented on the GPU by the library's BatchTransform (what training does), against
   the training step's demand (2 x batch x iterations/s);
3. encoding throughput (frozen encoder, inference);
4. attacker-iterations/s per GPU: one 'paper' attacker (fit_classifier) and K vmapped 'mlp'
   attackers on cached encodings.

Training variants run on random images already on the device (compute only); the loader is
measured on its own against what the step needs. Variants are interleaved in rounds, and
medians reported, like the CPU benchmarks.
"""

from __future__ import annotations

import os

# As the privenc command line does (privenc.cli.main), before torch loads OpenMP: the loader
# workers share the CPU cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported by path

from privenc.adversarial import Players, classifier_step, encoder_step  # noqa: E402
from privenc.config import Config, load_config  # noqa: E402
from privenc.data import ImageDataset  # noqa: E402
from privenc.data.cache import ImageCache  # noqa: E402
from privenc.data.transforms import BatchTransform, train_transform  # noqa: E402
from privenc.models import Classifier, Encoder  # noqa: E402
from privenc.verify import Encoded, fit_classifier  # noqa: E402

import flops  # noqa: E402
from attackers import VmappedAttackers  # noqa: E402
from changes import NORM_VERSIONS, with_norm  # noqa: E402

PEAK = 989e12
"""Dense bf16 tensor-core peak of an H100 SXM and of an H200, FLOP/s."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(variants: dict, rounds: int, seconds: float, device: torch.device) -> dict[str, list[float]]:
    """Each variant: a callable doing one unit (returns units); timed for ~``seconds`` per round,
    rounds interleaved. Returns units/s per round."""
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            fn = variants[name]
            sync(device)
            started, done = time.perf_counter(), 0
            while True:
                done += fn()
                sync(device)
                elapsed = time.perf_counter() - started
                if elapsed >= seconds:
                    break
            rates[name].append(done / elapsed)
    return rates


# --------------------------------------------------------------------------- training step


@dataclasses.dataclass
class StepVariant:
    name: str
    amp: bool
    channels_last: bool
    compile: bool
    norm: str = ""
    """An earlier per-location BatchNorm forward (a key of ``changes.NORM_VERSIONS``; empty: the
    library's), to check that the CPU speed-ups are no slower on a GPU."""


def build_step(config: Config, device: torch.device, variant: StepVariant):
    """One training iteration (classifier step + encoder step) of ``variant`` as a callable."""
    torch.manual_seed(0)
    t, size, batch = config.train, config.data.image_size, config.train.batch_size
    encoder = Encoder(config.encoder, size)
    if variant.norm:
        with_norm(encoder, NORM_VERSIONS[variant.norm])
    channels, height, _ = encoder.output_shape
    private = nn.ModuleList([Classifier(config.classifier, channels, 2, height)])
    desirable = Classifier(config.classifier, channels, 2, height)
    modules = [encoder, *private, desirable]
    for m in modules:
        m.to(device)
        if variant.channels_last:
            m.to(memory_format=torch.channels_last)
    classifier_opt = torch.optim.Adam([p for m in [*private, desirable] for p in m.parameters()], lr=t.classifier_lr)
    encoder_opt = torch.optim.Adam(encoder.parameters(), lr=t.encoder_lr)
    if variant.compile:
        # The encoder only: it holds nearly all the FLOPs (the classifiers see 28x28 encodings),
        # and compiling the classifiers too would double the compile time of this short check.
        players = Players(torch.compile(encoder), private, desirable)
    else:
        players = Players(encoder, private, desirable)
    memory = torch.channels_last if variant.channels_last else torch.contiguous_format
    images = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory) for _ in range(2)]
    private_labels = torch.randint(0, 2, (batch, 1), device=device)
    desirable_labels = torch.randint(0, 2, (batch,), device=device)

    def step() -> int:
        classifier_step(players, classifier_opt, images[0], private_labels, desirable_labels, variant.amp)
        encoder_step(players, encoder_opt, images[1], private_labels, desirable_labels, t.encoder_loss, t.alpha,
                     variant.amp)
        return 1

    return step


def training(config: Config, device: torch.device, rounds: int, seconds: float, use_compile: bool,
             flops_per_iteration: float) -> tuple[list[list[str]], dict[str, float]]:
    variants = [StepVariant("eager fp32", False, False, False), StepVariant("bf16 autocast", True, False, False),
                StepVariant("bf16 + channels_last", True, True, False),
                *(StepVariant(f"bf16 + channels_last, per-location BN {name.split(':')[0]}", True, True, False,
                              norm=name)
                  for name in NORM_VERSIONS if not name.startswith("current"))]
    if use_compile:
        variants.append(StepVariant("bf16 + channels_last + torch.compile (encoder)", True, True, True))
    steps, notes = {}, {}
    for v in variants:
        try:
            step = build_step(config, device, v)
            started = time.perf_counter()
            for _ in range(3):  # warm-up: cuDNN autotuning, compilation
                step()
            sync(device)
            notes[v.name] = f"warm-up {time.perf_counter() - started:.0f} s"
            steps[v.name] = step
        except Exception as err:  # a variant that cannot run is reported, not fatal
            traceback.print_exc()
            notes[v.name] = f"failed: {type(err).__name__}: {str(err)[:120]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rates = timed_rounds(steps, rounds, seconds, device)
    batch = config.train.batch_size
    rows, medians = [], {}
    base = statistics.median(rates["eager fp32"]) if rates.get("eager fp32") else None
    for v in variants:
        if v.name not in rates:
            rows.append(["training iteration", v.name, "-", "-", "-", "-", notes[v.name]])
            continue
        its = statistics.median(rates[v.name])
        medians[v.name] = its
        fraction = its * flops_per_iteration / PEAK
        rows.append(["training iteration", v.name, f"{its:.3g} it/s", f"{2 * batch * its:,.0f} img/s",
                     f"{its / base:.2f}x" if base else "-",
                     f"{100 * fraction:.1f}% of bf16 peak" if device.type == "cuda" else "- (not a GPU)",
                     notes[v.name]])
    return rows, medians


# --------------------------------------------------------------------------- loader


def _as_is(image: torch.Tensor) -> torch.Tensor:
    return image


def loader_rates(config: Config, device: torch.device, count: int, workers: int, rounds: int,
                 seconds: float, folder: Path) -> dict[str, list[float]]:
    """Images/s delivered on the device, from a uint8 memmap cache of ``count`` images."""
    cfg, batch = config.data, config.train.batch_size
    path = folder / "cache.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, cfg.load_size, cfg.load_size, 3))
    rng = np.random.default_rng(0)
    for start in range(0, count, 256):
        stop = min(count, start + 256)
        array[start:stop] = rng.integers(0, 256, size=(stop - start, *array.shape[1:]), dtype=np.uint8)
    array.flush()
    del array
    indices = np.arange(count)
    labels = np.zeros((count, 1), dtype=np.int64)
    cache = ImageCache(path, indices)
    torch.manual_seed(0)  # BatchTransform draws from torch's global generator
    batch_augment = BatchTransform(cfg, augment=True)

    def make(transform, pin: bool):
        dataset = ImageDataset(cache, indices, labels, transform)
        return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                          pin_memory=pin and device.type == "cuda", persistent_workers=workers > 0,
                          prefetch_factor=4 if workers else None)

    loaders = {
        "per-item CPU augmentation (per-image reference), pinned": (make(train_transform(cfg), True), False),
        "uint8 batches, BatchTransform on the device (library default), pinned": (make(_as_is, True), True),
        "uint8 batches, BatchTransform on the device, not pinned": (make(_as_is, False), True),
    }
    iterators = {name: iter(loader) for name, (loader, _) in loaders.items()}

    def unit(name: str) -> int:
        loader, on_device = loaders[name]
        try:
            images, _ = next(iterators[name])
        except StopIteration:
            iterators[name] = iter(loader)
            images, _ = next(iterators[name])
        images = images.to(device, non_blocking=True)
        if on_device:
            images = batch_augment(images)
        return images.shape[0]

    for name in loaders:  # start the workers outside the timing
        unit(name)
    return timed_rounds({name: (lambda n=name: unit(n)) for name in loaders}, rounds, seconds, device)


# --------------------------------------------------------------------------- encoding, attackers


def encoding_rates(config: Config, device: torch.device, rounds: int, seconds: float) -> dict[str, list[float]]:
    torch.manual_seed(0)
    size, batch = config.data.image_size, 2 * config.train.batch_size
    encoder = Encoder(config.encoder, size).to(device).eval()
    cl = Encoder(config.encoder, size).to(device).eval().to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size, device=device)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))

    @torch.inference_mode()
    def fp32() -> int:
        encoder(images)
        return batch

    @torch.inference_mode()
    def bf16() -> int:
        with amp:
            cl(images_cl)
        return batch

    fp32(), bf16()
    return timed_rounds({"fp32": fp32, "bf16 + channels_last": bf16}, rounds, seconds, device)


def attacker_rates(config: Config, device: torch.device, rounds: int, seconds: float, count: int,
                   vmapped: int) -> dict[str, list[float]]:
    """Attacker-iterations/s on cached encodings held on the device."""
    torch.manual_seed(0)
    encoder = Encoder(config.encoder, config.data.image_size)
    channels, size, _ = encoder.output_shape
    x = torch.randn(count, channels, size, size, device=device)
    y = torch.randint(0, 2, (count,), device=device)
    encoded = Encoded({"train": x, "val": x[:256], "test": x[:256]}, {"train": y, "val": y[:256], "test": y[:256]}, 2)
    iters = 20
    settings = dataclasses.replace(config.verify, max_iters=iters, eval_every=iters, patience=10**6)

    def paper() -> int:
        torch.manual_seed(0)
        model = Classifier(config.classifier, channels, 2, size)
        fit_classifier(model, encoded, settings, config.verify.lr, 0, device, "paper")
        return iters

    stacked = VmappedAttackers(config, Encoded({"train": x}, {"train": y}, 2), "mlp", vmapped)

    def mlp() -> int:
        return stacked.iterations(iters)

    paper(), mlp()
    return timed_rounds({"1 'paper' attacker (fit_classifier)": paper,
                         f"{vmapped} 'mlp' attackers, vmapped": mlp}, rounds, seconds, device)


# --------------------------------------------------------------------------- main


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (demo preset, batch 8), short timings")
    parser.add_argument("--batch", type=int, default=128, help="training batch of the paper preset (default 128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per variant per round")
    parser.add_argument("--workers", type=int, default=0, help="loader workers (default: all CPU cores)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available here; use --device cpu --quick for a smoke run")
    torch.backends.cudnn.benchmark = True
    started = time.time()
    if args.quick:
        config = load_config("demo", ["train.batch_size=8"])
        rounds, seconds, loader_count, attackers_count, vmapped = 1, 0.2, 64, 256, 4
    else:
        config = load_config("paper", [f"train.batch_size={args.batch}"])
        rounds, seconds, loader_count, attackers_count, vmapped = args.rounds, args.seconds, 2048, 16384, 16
    use_compile = args.compile if args.compile is not None else (device.type == "cuda")
    workers = args.workers or len(os.sched_getaffinity(0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    counted = flops.iteration_flops(config)
    batch = config.train.batch_size
    print(f"gpu_check on {name}, torch {torch.__version__}; {config.data.image_size}px, batch {batch}; "
          f"{counted['total'] / 1e12:.3f} TFLOP per iteration", flush=True)

    rows, medians = training(config, device, rounds, seconds, use_compile, counted["total"])
    print(markdown(rows, ["what", "variant", "rate", "images/s", "vs eager", "of peak", "note"]), flush=True)
    best = max(medians.values()) if medians else 0.0
    demand = 2 * batch * best
    with tempfile.TemporaryDirectory(prefix="privenc-gpu-check-") as tmp:
        loader = loader_rates(config, device, loader_count, workers, rounds, seconds, Path(tmp))
    for variant, values in loader.items():
        rate = statistics.median(values)
        rows.append(["loader", f"{variant}, {workers} workers", f"{rate:,.0f} img/s", "",
                     f"{rate / demand:.2f}x demand" if demand else "-", "",
                     "keeps up" if rate >= demand else "BOTTLENECK"])
    rows.append(["demand", "fastest training variant", f"{demand:,.0f} img/s", "", "", "", "2 x batch x it/s"])
    for variant, values in encoding_rates(config, device, rounds, seconds).items():
        rows.append(["encoding", variant, f"{statistics.median(values):,.0f} img/s", "", "", "", "inference"])
    for variant, values in attacker_rates(config, device, rounds, seconds, attackers_count, vmapped).items():
        rows.append(["attackers", variant, f"{statistics.median(values):,.0f} attacker-it/s", "", "", "",
                     f"per GPU, batch {config.verify.batch_size}"])
    header = ["what", "variant", "rate", "images/s", "ratio", "of bf16 peak", "note"]
    text = (f"# gpu_check\n\n- device: {name}\n- torch {torch.__version__}\n- command: python benchmarks/gpu_check.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}\n- {config.data.image_size}px, batch {batch}, "
            f"{counted['total'] / 1e12:.3f} TFLOP per iteration (FlopCounterMode), peak used: "
            f"{PEAK / 1e12:.0f} TFLOP/s dense bf16\n- wall time {time.time() - started:.0f} s\n\n"
            + markdown(rows, header) + "\n")
    print("\n" + markdown(rows, header), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu.md").write_text(text)
        print(f"written to {Path(out) / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
