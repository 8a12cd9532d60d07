"""The GPU measurements of issue 20, as one script that a lent card can run inside one device
call: sections in priority order, each with its own time limit, numbers written as they come.

    python benchmarks/gpu_check.py --out $OUT            # on a CUDA machine, about 8 minutes
    python benchmarks/gpu_check.py --budget 300          # a shorter total budget (seconds)
    python benchmarks/gpu_check.py --sections step,smoke # some sections only
    python benchmarks/gpu_check.py --device cpu --quick  # dry run on a CPU: tiny sizes, no compile

Sections, in priority order:
1. tests      the device-capable tests (`pytest -m cuda`) with PRIVENC_TEST_DEVICE set to the
              device, in a subprocess; its summary line and failures;
2. step       the paper preset's training iteration (classifier step + encoder step, batch 128,
              224 px) in eager fp32, bf16 autocast, bf16 + channels-last and bf16 + channels-last
              + torch.compile (the encoder): iterations/s, images/s, the fraction of the card's
              dense bf16 datasheet peak that the counted FLOPs (benchmarks/flops.py) reach, peak
              memory; then the largest batch that fits (doubling until out of memory, then
              bisecting, in a subprocess so that a broken CUDA context cannot end the script);
3. loader     the training loader (BatchStream over a uint8 cache, pinned memory, BatchTransform
              on the device) in images/s for several worker counts, beside the step's demand;
4. attackers  verification attackers (fit_classifier, each family of the paper preset's
              protocol) on cached encodings: attacker-iterations/s;
5. smoke      `privenc train --config paper` on the synthetic scenes rendered at 256 -> 224 px
              (no Places-365 on a lent card) with a short schedule, then `privenc verify` on it
              with a short protocol.

Each section gets its share of --budget plus what earlier sections left unused; one that runs
out is cut (an alarm in this process, a killed process group for subprocesses) and recorded as
cut with what it had finished. After every section gpu.md gains its table and gpu.json is
rewritten (both flushed to disk), so a run stopped from outside still returns what it finished.
"""

from __future__ import annotations

import os

# As the privenc command line does (privenc.cli.main), before torch loads OpenMP: the loader
# workers share the CPU cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The checkout's package whether installed or not: a lent card gets a copy of the checkout and
# nothing installed from it.
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported by path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from privenc.adversarial import Players, classifier_step, encoder_step  # noqa: E402
from privenc.adversaries import fresh_families
from privenc.attackers import Encoded
from privenc.config import Config, load_config  # noqa: E402
from privenc.data import ImageDataset  # noqa: E402
from privenc.data.cache import ImageCache  # noqa: E402
from privenc.data.transforms import BatchTransform  # noqa: E402
from privenc.models import Classifier, Encoder, build_attacker  # noqa: E402
from privenc.stream import BatchStream  # noqa: E402
from privenc.verification import fit_classifier  # noqa: E402

import flops  # noqa: E402
from measure import as_is, git_revision  # noqa: E402

SECTIONS = ("tests", "step", "loader", "attackers", "smoke")
SHARES = {"tests": 0.25, "step": 0.32, "loader": 0.07, "attackers": 0.08, "smoke": 0.28}
"""Fractions of --budget; unused time passes on to the next section."""
DEFAULT_BUDGET = 480.0
"""Seconds: leaves room in a 600 s device call for start-up, import and the files' return."""


def shares(sections: list[str] | tuple[str, ...]) -> dict[str, float]:
    """The selected sections' fractions of --budget, rescaled to add up to 1: a run of some
    sections gives them the whole budget, as a run of all gives all."""
    total = sum(SHARES[name] for name in sections)
    return {name: SHARES[name] / total for name in sections}

BF16_DENSE_PEAK = (
    ("H200", 989.4e12, "NVIDIA H200 datasheet, dense BF16 Tensor Core 989.4 TFLOP/s (1,979 with sparsity)"),
    ("H100 80GB HBM3", 989.4e12, "NVIDIA H100 SXM datasheet, dense BF16 Tensor Core 989.4 TFLOP/s"),
    ("H100 SXM", 989.4e12, "NVIDIA H100 SXM datasheet, dense BF16 Tensor Core 989.4 TFLOP/s"),
)
"""Card name (as torch reports it) -> dense bf16 peak, FLOP/s, and where the figure comes from."""

SMOKE_TASKS = ("g1c0", "g1c1")  # synthetic categories: private, desirable
NOTHING = "- no measurement finished"


class SectionCut(BaseException):
    """A section's time is up. A BaseException, so that the sections' own ``except Exception``
    (a variant that fails is recorded, not fatal) does not swallow it."""


def _alarm(signum, frame) -> None:
    raise SectionCut()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def datasheet_peak(name: str) -> tuple[float | None, str]:
    for key, peak, source in BF16_DENSE_PEAK:
        if key in name:
            return peak, source
    return None, f"no datasheet figure in this script for {name!r} (give one with --peak-tflops)"


# --------------------------------------------------------------------------- the report


class Report:
    """gpu.json (rewritten) and gpu.md (appended) in ``out``, each flushed to disk as it grows."""

    def __init__(self, out: Path, header: dict[str, Any]) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"header": header, "sections": {}}
        lines = ["# gpu_check", ""] + [f"- {key}: {value}" for key, value in header.items()]
        (out / "gpu.md").write_text("")
        self.append("\n".join(lines) + "\n")
        self.save()

    def append(self, text: str) -> None:
        with open(self.out / "gpu.md", "a") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(text, flush=True)

    def save(self) -> None:
        tmp = self.out / "gpu.json.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out / "gpu.json")


def markdown(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Section:
    """What a section function gets: where it stands in time, and a record to fill (saved to
    gpu.json whenever it calls ``save``)."""

    name: str
    deadline: float
    record: dict[str, Any]
    report: Report

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.report.save()


# --------------------------------------------------------------------------- subprocesses


def run_logged(command: list[str], log: Path, section: Section, env: dict[str, str] | None = None,
               cwd: Path = ROOT) -> tuple[int | None, float]:
    """Run ``command`` in its own process group, output appended to ``log``, until the
    section's deadline (less a margin to write the report); returns (exit code or None when
    killed, seconds)."""
    started = time.monotonic()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(1.0, section.left() - 3))
        except (subprocess.TimeoutExpired, SectionCut):
            code = None
        finally:
            if process.poll() is None:  # the whole group: pytest's and the loader's children too
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        f.write(f"[exit {code}, {time.monotonic() - started:.1f} s]\n")
    return code, round(time.monotonic() - started, 1)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT / "src"), env.get("PYTHONPATH", "")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --------------------------------------------------------------------------- 1. tests


def section_tests(s: Section, args: argparse.Namespace, state: dict[str, Any]) -> None:
    selection = ["tests/test_models.py::test_attackers_output_logits"] if args.quick else ["-m", "cuda", "tests"]
    # -v: a line per test, so that a cut run still tells which tests passed.
    command = [sys.executable, "-m", "pytest", "-v", "-rfEs", "--durations=5", "-p", "no:cacheprovider", *selection]
    log = args.out / "tests.log"
    s.record.update(command=f"PRIVENC_TEST_DEVICE={args.device} " + " ".join(command[1:]), log=log.name)
    s.save()
    code, seconds = run_logged(command, log, s, child_env(PRIVENC_TEST_DEVICE=str(args.device)))
    text = log.read_text()
    summaries = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|errors?)\b.*?)\s*=*$", text, re.M)
    outcomes = re.findall(r"^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M)
    s.record.update(exit_code=code, seconds=seconds, summary=summaries[-1] if summaries else None,
                    outcomes={o: outcomes.count(o) for o in sorted(set(outcomes))},
                    failures=re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M))
    if code is None:
        raise SectionCut()


def tests_markdown(record: dict[str, Any]) -> str:
    if "command" not in record:
        return NOTHING
    lines = [f"- command: `{record.get('command')}` (log: {record.get('log')})",
             f"- summary: {record.get('summary')}; exit code {record.get('exit_code')}; "
             f"per test: {record.get('outcomes')}"]
    lines += [f"- failed: `{name}`" for name in record.get("failures", [])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- 2. step


@dataclasses.dataclass(frozen=True)
class StepVariant:
    name: str
    amp: bool
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool = False
    """torch.backends.cudnn.benchmark (autotuned convolutions); the library leaves it off."""


VARIANTS = (StepVariant("eager fp32", False, False, False), StepVariant("bf16 autocast", True, False, False),
            StepVariant("bf16 + channels-last", True, True, False),
            StepVariant("bf16 + channels-last + cudnn.benchmark", True, True, False, cudnn_benchmark=True),
            StepVariant("bf16 + channels-last + torch.compile (encoder)", True, True, True))
BY_NAME = {v.name: v for v in VARIANTS}


def build_step(config: Config, device: torch.device, variant: StepVariant, batch: int) -> Callable[[], None]:
    """One training iteration (classifier step + encoder step) of ``variant``, on random images
    already on the device (compute only: the loader is section 3), as a callable."""
    torch.manual_seed(0)
    t, size = config.train, config.data.image_size
    encoder = Encoder(config.encoder, size)
    channels, height, _ = encoder.output_shape
    private = nn.ModuleList([Classifier(config.classifier, channels, 2, height)])
    desirable = Classifier(config.classifier, channels, 2, height)
    memory = torch.channels_last if variant.channels_last else torch.contiguous_format
    for m in [encoder, *private, desirable]:
        m.to(device, memory_format=memory)
    classifier_opt = torch.optim.Adam([p for m in [*private, desirable] for p in m.parameters()], lr=t.classifier_lr)
    encoder_opt = torch.optim.Adam(encoder.parameters(), lr=t.encoder_lr)
    # The encoder only: it holds nearly all the FLOPs (the classifiers see 28x28 encodings), and
    # compiling the classifiers too would double the compile time of a short check.
    players = Players(torch.compile(encoder) if variant.compile else encoder, private, desirable)
    images = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory) for _ in range(2)]
    private_labels = torch.randint(0, 2, (batch, 1), device=device)
    desirable_labels = torch.randint(0, 2, (batch,), device=device)

    def step() -> None:
        torch.backends.cudnn.benchmark = variant.cudnn_benchmark  # a global: set for each variant's steps
        classifier_step(players, classifier_opt, images[0], private_labels, desirable_labels, variant.amp)
        encoder_step(players, encoder_opt, images[1], private_labels, desirable_labels, t.encoder_loss, t.alpha,
                     variant.amp)

    return step


def timed(step: Callable[[], None], seconds: float, device: torch.device) -> float:
    """Iterations/s over about ``seconds``; synchronizing only between growing chunks of steps,
    so that the launch queue does not drain after every step."""
    sync(device)
    started, done, chunk = time.perf_counter(), 0, 1
    while True:
        for _ in range(chunk):
            step()
        done += chunk
        sync(device)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed
        chunk = min(2 * chunk, 64)


def section_step(s: Section, args: argparse.Namespace, state: dict[str, Any]) -> None:
    """The eager variants, then the largest batch (a bounded search), then torch.compile (whose
    compilation may take much of the section), then more interleaved rounds if time is left."""
    config, device, batch = state["config"], args.device, state["config"].train.batch_size
    counted = flops.iteration_flops(config)
    peak, source = state["peak"]
    s.record.update(preset=_preset(args, batch)[0], batch=batch, image_size=config.data.image_size,
                    flops_per_iteration=counted["total"], peak_flops=peak, peak_source=source,
                    cudnn_tf32=torch.backends.cudnn.allow_tf32, matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
                    variants={})
    s.save()
    steps: dict[str, Callable[[], None]] = {}
    eager = [v for v in VARIANTS if not v.compile]
    for v in eager:
        _measure_variant(s, args, config, v, steps, counted["total"], peak)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the cached blocks would be missing from the search's card
    measured = [v for v in eager if "it_per_s" in s.record["variants"][v.name]]
    if measured:
        chosen = max(measured, key=lambda v: s.record["variants"][v.name]["it_per_s"])
        # A share of what is left, the rest for compilation; a dry run's child mostly starts up.
        _largest_batch(s, args, chosen, batch, limit=max(10.0, (0.6 if args.quick else 0.3) * s.left()))
    for v in VARIANTS:
        if v.compile and args.compile:
            _measure_variant(s, args, config, v, steps, counted["total"], peak)
    for _ in range(args.rounds - 1):  # the first round of each is recorded already
        if s.left() < len(steps) * args.seconds * 1.5:
            break
        for name, step in steps.items():
            s.record["variants"][name]["rates"].append(timed(step, args.seconds, device))
        _step_summaries(s.record, counted["total"], peak, batch)
        s.save()


def _measure_variant(s: Section, args: argparse.Namespace, config: Config, v: StepVariant,
                     steps: dict[str, Callable[[], None]], flops_per_iteration: float, peak: float | None) -> None:
    device, batch = args.device, config.train.batch_size
    row: dict[str, Any] = {}
    s.record["variants"][v.name] = row
    s.save()
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        started = time.monotonic()
        step = build_step(config, device, v, batch)
        for _ in range(3):  # warm-up: cuDNN autotuning, compilation, Adam's state
            step()
        sync(device)
        row["warmup_s"] = round(time.monotonic() - started, 1)
        row["rates"] = [timed(step, args.seconds, device)]
        if device.type == "cuda":  # what this variant added to what earlier ones hold
            row["peak_memory_gib"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**30, 2)
        steps[v.name] = step
    except Exception as err:  # a variant that cannot run is recorded, not fatal
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    _step_summaries(s.record, flops_per_iteration, peak, batch)
    s.save()


def _largest_batch(s: Section, args: argparse.Namespace, variant: StepVariant, batch: int, limit: float) -> None:
    """Run the search in a child process (an error there cannot break this process's CUDA
    context) for at most ``limit`` seconds; its probes, one JSON line each, go to batch.jsonl."""
    search: dict[str, Any] = {"variant": variant.name, "probes": [], "file": "batch.jsonl"}
    s.record["largest_batch"] = search
    s.save()
    command = [sys.executable, str(Path(__file__).resolve()), "--batch-search", variant.name, "--device",
               str(args.device), "--start-batch", str(batch), "--max-batch", str(args.max_batch),
               *(["--quick"] if args.quick else [])]
    probes = args.out / "batch.jsonl"
    with open(probes, "w") as out, open(args.out / "batch.log", "a") as log:
        process = subprocess.Popen(command, stdout=out, stderr=log, env=child_env(), cwd=ROOT, start_new_session=True)
        try:
            process.wait(timeout=min(limit, max(1.0, s.left() - 3)))
        except (subprocess.TimeoutExpired, SectionCut):
            search["cut"] = True
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            search["probes"] = [json.loads(line) for line in probes.read_text().splitlines() if line.startswith("{")]
            _batch_summary(search)
            s.save()


def _step_summaries(record: dict[str, Any], flops_per_iteration: float, peak: float | None, batch: int) -> None:
    measured = [row for row in record["variants"].values() if row.get("rates")]
    for row in measured:
        row["it_per_s"] = statistics.median(row["rates"])
        row["images_per_s"] = 2 * batch * row["it_per_s"]  # an iteration takes two batches
        row["tflop_per_s"] = row["it_per_s"] * flops_per_iteration / 1e12
        row["fraction_of_peak"] = row["it_per_s"] * flops_per_iteration / peak if peak else None
    base = record["variants"].get("eager fp32", {}).get("it_per_s")
    for row in measured:
        row["vs_eager_fp32"] = row["it_per_s"] / base if base else None
    if measured:  # the loader's target (section 3)
        fastest = max(measured, key=lambda row: row["it_per_s"])
        record["fastest"] = next(name for name, row in record["variants"].items() if row is fastest)
        record["demand_images_per_s"] = fastest["images_per_s"]


def _batch_summary(search: dict[str, Any]) -> None:
    fits = [p["batch"] for p in search["probes"] if p.get("fits")]
    fails = [p["batch"] for p in search["probes"] if p.get("fits") is False]
    search["largest_fitting"] = max(fits) if fits else None
    search["smallest_failing"] = min(fails) if fails else None


def step_markdown(record: dict[str, Any]) -> str:
    if "batch" not in record:
        return NOTHING
    peak = record.get("peak_flops")
    lines = [f"- {record.get('preset')} preset step, batch {record.get('batch')} at {record.get('image_size')} px: "
             f"{record.get('flops_per_iteration', 0) / 1e12:.2f} TFLOP per iteration (benchmarks/flops.py)",
             f"- peak: {record.get('peak_source')}",
             f"- cuDNN TF32 {record.get('cudnn_tf32')}, matmul TF32 {record.get('matmul_tf32')} (torch defaults)", ""]
    rows = []
    for name, row in record.get("variants", {}).items():
        fraction = row.get("fraction_of_peak")
        rows.append([name, _g(row.get("it_per_s")), _g(row.get("images_per_s")), _g(row.get("tflop_per_s")),
                     f"{100 * fraction:.1f}%" if fraction is not None else ("-" if peak else "no figure"),
                     _g(row.get("vs_eager_fp32")), row.get("peak_memory_gib"), row.get("warmup_s"),
                     len(row.get("rates", [])), row.get("error")])
    lines.append(markdown(rows, ["variant", "it/s", "images/s", "TFLOP/s", "of bf16 peak", "vs eager fp32",
                                 "peak memory GiB", "warm-up s", "rounds", "error"]))
    search = record.get("largest_batch")
    if search:
        probes = ", ".join(f"{p['batch']} {'fits' if p.get('fits') else 'no'}" + (
            f" ({p['peak_memory_gib']} GiB)" if p.get("peak_memory_gib") is not None else "")
            for p in search["probes"])
        failing = search.get("smallest_failing")
        lines += ["", f"- largest batch, {search['variant']}: {search.get('largest_fitting')} fits, "
                      + (f"{failing} does not" if failing else "no failure up to the search's end")
                      + f"{' (search cut)' if search.get('cut') else ''}; probes: {probes or 'none'}"]
    return "\n".join(lines)


def _g(value: float | None) -> str | None:
    return None if value is None else f"{value:,.3g}" if value < 1000 else f"{value:,.0f}"


def batch_search(args: argparse.Namespace) -> int:
    """The child process of section 2: one JSON line per batch size tried, doubling from
    --start-batch until a step fails, then bisecting (to 1/16 of the last fitting batch)."""
    config = load_config(*_preset(args, args.start_batch))
    variant = BY_NAME[args.batch_search]
    device = args.device

    def probe(batch: int) -> bool:
        result: dict[str, Any] = {"batch": batch}
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step = build_step(config, device, variant, batch)
            for _ in range(2):  # the second step holds Adam's state too
                step()
            sync(device)
            result["fits"] = True
            if device.type == "cuda":
                result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except torch.cuda.OutOfMemoryError:
            result["fits"] = False
        except Exception as err:  # not memory: the search cannot go on trusting this process
            result["fits"], result["error"] = False, f"{type(err).__name__}: {str(err)[:300]}"
        step = None
        print(json.dumps(result), flush=True)
        if "error" in result:
            raise SystemExit(1)
        return result["fits"]

    low, high = 0, None
    batch = args.start_batch
    while high is None and batch <= args.max_batch:
        if probe(batch):
            low, batch = batch, 2 * batch
        else:
            high = batch
    if high is None:
        return 0
    while high - low > max(1, low // 16):
        middle = (low + high) // 2
        if probe(middle):
            low = middle
        else:
            high = middle
    return 0


# --------------------------------------------------------------------------- 3. loader


def section_loader(s: Section, args: argparse.Namespace, state: dict[str, Any]) -> None:
    """The training loader as train() builds it, on a uint8 memmap cache of random pixels (the
    loader's cost does not depend on what the pixels show)."""
    config, device = state["config"], args.device
    cfg, batch = config.data, config.train.batch_size
    count = 8 * batch if args.quick else 2048
    cores = len(os.sched_getaffinity(0))
    workers = sorted({0, min(4, cores), cores})
    step = state.get("step", {})
    s.record.update(images=count, load_size=cfg.load_size, image_size=cfg.image_size, batch=batch, cores=cores,
                    demand_images_per_s=step.get("demand_images_per_s"), demand_from=step.get("fastest"), rates={})
    s.save()
    with tempfile.TemporaryDirectory(prefix="privenc-gpu-check-") as tmp:
        path = Path(tmp) / "cache.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, cfg.load_size,
                                                                                  cfg.load_size, 3))  # HWC, as cached
        rng = np.random.default_rng(0)
        for start in range(0, count, 256):
            array[start:start + 256] = rng.integers(0, 256, size=(min(256, count - start), *array.shape[1:]),
                                                    dtype=np.uint8)
        array.flush()
        del array
        indices = np.arange(count)
        # Each cached image 8 times: BatchStream starts its workers once per epoch, and a real
        # training pool is far longer than this cache.
        epoch = np.tile(indices, 8)
        dataset = ImageDataset(ImageCache(path, indices), epoch, np.zeros((len(epoch), 1), dtype=np.int64), as_is)
        augment = BatchTransform(cfg, augment=True)
        seconds = max(0.2, min(args.seconds, (s.left() - 5) / (2 * len(workers))))
        for n in workers:
            stream = BatchStream(dataset, batch, seed=0, num_workers=n, pin_memory=device.type == "cuda")

            def one(stream: BatchStream = stream) -> None:
                images, _ = next(stream)
                augment(images.to(device, non_blocking=True))

            one()  # start the workers outside the timing
            rate = timed(one, seconds, device) * batch
            s.record["rates"][str(n)] = rate
            s.save()
            del stream


def loader_markdown(record: dict[str, Any]) -> str:
    if not record.get("rates"):
        return NOTHING
    demand = record.get("demand_images_per_s")
    rows = [[f"{n} workers" + (" (data.num_workers default)" if n == "0" else ""), _g(rate),
             f"{rate / demand:.2f}x" if demand else "-",
             ("keeps up" if rate >= demand else "BOTTLENECK") if demand else "-"]
            for n, rate in record.get("rates", {}).items()]
    return (f"- BatchStream over a uint8 cache of {record.get('images')} images at {record.get('load_size')} px, "
            f"each 8 times an epoch, batch {record.get('batch')}, pinned on CUDA, BatchTransform on the device "
            f"to {record.get('image_size')} px; "
            f"{record.get('cores')} CPU cores\n- the step's demand: {_g(demand)} images/s "
            f"({record.get('demand_from')}, 2 x batch x it/s)\n\n"
            + markdown(rows, ["loader", "images/s", "of demand", "verdict"]))


# --------------------------------------------------------------------------- 4. attackers


def section_attackers(s: Section, args: argparse.Namespace, state: dict[str, Any]) -> None:
    """As verification trains them: encodings cached on the host (encode_task's output), each
    batch copied to the device by fit_classifier."""
    config, device = state["config"], args.device
    channels, size, _ = Encoder(config.encoder, config.data.image_size).output_shape
    count = 512 if args.quick else 16384
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, channels, size, size, generator=generator)
    y = torch.randint(0, 2, (count,), generator=generator)
    encoded = Encoded({"train": x, "val": x[:256], "test": x[:256]}, {"train": y, "val": y[:256], "test": y[:256]}, 2)
    # 'adaptive' fine-tunes a saved classifier of a run (none here): the same step as its family's
    families = fresh_families(config.verify.attackers)
    s.record.update(encodings=count, shape=[channels, size, size], batch=config.verify.batch_size, rates={})
    s.save()
    for family in families:
        seconds = max(0.2, min(args.seconds, s.left() / (2 * (len(families) - len(s.record["rates"])))))
        iters = 10

        def fit(n: int, family: str = family) -> None:
            torch.manual_seed(0)
            model = build_attacker(family, config.classifier, channels, 2, size)
            settings = dataclasses.replace(config.verify, max_iters=n, eval_every=n, patience=10**6)
            fit_classifier(model, encoded, settings, config.verify.lr, 0, device, family)

        fit(iters)  # warm-up
        sync(device)
        # Grow the fit until it lasts about ``seconds``: its final evaluations are then a small part.
        while True:
            started = time.perf_counter()
            fit(iters)
            sync(device)
            elapsed = time.perf_counter() - started
            if elapsed >= seconds or s.left() < 4 * elapsed:
                break
            iters *= 2
        s.record["rates"][family] = {"iterations": iters, "seconds": round(elapsed, 3),
                                     "attacker_iterations_per_s": iters / elapsed}
        s.save()


def attackers_markdown(record: dict[str, Any]) -> str:
    if not record.get("rates"):
        return NOTHING
    batch = record.get("batch")
    rows = [[family, r["iterations"], _g(r["attacker_iterations_per_s"]), _g(r["attacker_iterations_per_s"] * batch),
             _g(10000 / r["attacker_iterations_per_s"])] for family, r in record.get("rates", {}).items()]
    return (f"- fit_classifier on {record.get('encodings')} cached encodings of shape {record.get('shape')} "
            f"(host memory, as verify holds them), batch {batch}, one final evaluation per fit\n\n"
            + markdown(rows, ["family", "iterations timed", "attacker-iterations/s", "images/s",
                              "s per 10k iterations"]))


# --------------------------------------------------------------------------- 5. smoke


def smoke_settings(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--config/--set arguments of the smoke's train and verify."""
    private, desirable = SMOKE_TASKS
    if args.quick:
        train = ["--config", "demo", *_sets(["data.image_size=16", "data.load_size=18",
                                              "data.synthetic_per_category=20",
                                             "encoder.stages=[[4], [8]]", "classifier.stages=[[8], [8]]",
                                             "train.batch_size=8", "train.warmup_iters=2", "train.iters=2"])]
    else:
        # The paper preset with the data switched to the synthetic scenes at the preset's 256 ->
        # 224 px: 64 per category give a training pool above one batch of 128.
        train = ["--config", "paper", *_sets(["data.source=synthetic", "data.synthetic_per_category=64",
                                              f"train.warmup_iters={args.smoke_warmup}",
                                              f"train.iters={args.smoke_iters}"])]
    train += _sets([f"train.private={private}", f"train.desirable={desirable}", "train.log_every=50",
                    "train.val_batches=1", "train.checkpoint_every=100"])
    verify = _sets(["verify.attackers=[\"paper\"]", "verify.seeds=[0]", "verify.views=1",
                    f"verify.max_iters={8 if args.quick else 400}", f"verify.eval_every={4 if args.quick else 100}",
                    "verify.patience=1"])
    return train, verify


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def section_smoke(s: Section, args: argparse.Namespace, state: dict[str, Any]) -> None:
    train_args, verify_args = smoke_settings(args)
    log = args.out / "smoke.log"
    with tempfile.TemporaryDirectory(prefix="privenc-gpu-smoke-") as tmp:
        run, ver = Path(tmp) / "run", Path(tmp) / "verify"
        env = child_env(PRIVENC_CACHE=str(Path(tmp) / "cache"))
        base = [sys.executable, "-m", "privenc"]
        options = ["--device", str(args.device), "--no-progress"]
        train = [*base, "train", *train_args, "--out", str(run), *options]
        s.record["train"] = {"command": " ".join(["privenc", "train", *train_args, "--out", "RUN", *options])}
        s.save()
        code, seconds = run_logged(train, log, s, env)
        s.record["train"].update(exit_code=code, seconds=seconds)
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            s.record["train"]["last_record"] = records[-1] if records else None
        s.save()
        if code != 0:
            if code is None:
                raise SectionCut()
            return
        verify = [*base, "verify", str(run), "--task", SMOKE_TASKS[0], "--out", str(ver), "--device", str(args.device),
                  "--no-progress", *verify_args]
        s.record["verify"] = {"command": f"privenc verify RUN --task {SMOKE_TASKS[0]} --out VER --device {args.device} "
                                         f"--no-progress " + " ".join(verify_args)}
        s.save()
        code, seconds = run_logged(verify, log, s, env)
        s.record["verify"].update(exit_code=code, seconds=seconds)
        if (ver / "verify.json").exists():
            s.record["verify"]["attackers"] = [
                {k: r.get(k) for k in ("task", "attacker", "iters", "saturated", "test_acc_best", "seconds")}
                for r in json.loads((ver / "verify.json").read_text())]
        s.save()
        if code is None:
            raise SectionCut()


def smoke_markdown(record: dict[str, Any]) -> str:
    if "train" not in record:
        return NOTHING
    lines = []
    for part in ("train", "verify"):
        r = record.get(part)
        if not r:
            continue
        lines.append(f"- {part}: `{r['command']}`: exit code {r.get('exit_code')}, {r.get('seconds')} s")
    last = (record.get("train") or {}).get("last_record")
    if last:
        lines.append("- last metrics record: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in last.items()))
    for a in (record.get("verify") or {}).get("attackers", []):
        lines.append(f"- attacker {a.get('attacker')} on {a.get('task')}: test accuracy {a.get('test_acc_best')}, "
                     f"{a.get('iters')} iterations, saturated {a.get('saturated')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

RUNNERS = {"tests": (section_tests, tests_markdown), "step": (section_step, step_markdown),
           "loader": (section_loader, loader_markdown), "attackers": (section_attackers, attackers_markdown),
           "smoke": (section_smoke, smoke_markdown)}


def _preset(args: argparse.Namespace, batch: int) -> tuple[str, list[str]]:
    return ("demo", [f"train.batch_size={batch}"]) if args.quick else ("paper", [f"train.batch_size={batch}"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--quick", action="store_true",
                        help="dry run: demo preset at batch 8, tiny smoke, one small test, short timings")
    parser.add_argument("--out", type=Path, default=None, help="where gpu.md, gpu.json and the logs go "
                        "(default: $OUT when set, else ./gpu-check-out)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"total seconds for the sections (default {DEFAULT_BUDGET:.0f}; --quick 120)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    parser.add_argument("--batch", type=int, default=128, help="the training batch (default 128, the paper preset's)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per step variant, time permitting (default 3; --quick 1)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per round (default 4; --quick 0.2)")
    parser.add_argument("--max-batch", type=int, default=None, help="upper end of the batch search (default 8192)")
    parser.add_argument("--smoke-warmup", type=int, default=50, help="the smoke's train.warmup_iters")
    parser.add_argument("--smoke-iters", type=int, default=200, help="the smoke's train.iters")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, when the "
                        "script does not know the card")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="time the torch.compile variant (default: on CUDA, not with --quick)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave it out")
    parser.add_argument("--batch-search", default=None, help=argparse.SUPPRESS)  # section 2's child process
    parser.add_argument("--start-batch", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu --quick for a dry run")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda, cuda:N or cpu, got {args.device}")
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; sections are {', '.join(SECTIONS)}")
    args.budget = args.budget if args.budget is not None else (120.0 if args.quick else DEFAULT_BUDGET)
    args.seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 4.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.max_batch = args.max_batch or (64 if args.quick else 8192)
    args.compile = args.compile if args.compile is not None else (args.device.type == "cuda" and not args.quick)
    args.out = args.out or Path(os.environ.get("OUT") or "gpu-check-out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.batch_search:
        return batch_search(args)
    started = time.monotonic()
    config = load_config(*_preset(args, 8 if args.quick else args.batch))
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    peak, source = ((args.peak_tflops * 1e12, f"given: {args.peak_tflops} TFLOP/s") if args.peak_tflops
                    else datasheet_peak(name) if args.device.type == "cuda" else (None, "not a GPU"))
    header = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if args.device.type == "cuda" else None,
              "python": platform.python_version(), "revision": git_revision(),
              "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "budget_s": args.budget, "sections": ", ".join(args.sections), "peak": source,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    report = Report(args.out, header)
    state: dict[str, Any] = {"config": config, "peak": (peak, source)}  # and each section's record
    saved = 0.0
    fractions = shares(args.sections)
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for number, name in enumerate(SECTIONS, 1):
            if name not in args.sections:
                continue
            limit = fractions[name] * args.budget + saved
            record: dict[str, Any] = {"status": "running", "limit_s": round(limit, 1)}
            report.data["sections"][name] = state[name] = record
            report.save()
            section = Section(name, time.monotonic() + limit, record, report)
            began = time.monotonic()
            run, render = RUNNERS[name]
            try:
                signal.setitimer(signal.ITIMER_REAL, limit)
                try:
                    run(section, args, state)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                record["status"] = "done"
            except SectionCut:
                record["status"] = "cut"
            except Exception as err:  # recorded; the next section may still run
                traceback.print_exc()
                record["status"] = "failed"
                record["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            torch.backends.cudnn.benchmark = False  # the library's setting, whatever a variant left
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
            record["seconds"] = round(time.monotonic() - began, 1)
            saved = max(0.0, limit - record["seconds"])
            report.save()
            body = render(record)
            report.append(f"\n## {number}. {name}: {record['status']} ({record['seconds']} s of {limit:.1f} s)\n\n"
                          + body + (f"\n- error: {record['error']}" if "error" in record else ""))
    finally:
        signal.signal(signal.SIGALRM, previous)
    report.data["header"]["wall_s"] = round(time.monotonic() - started, 1)
    report.save()
    statuses = {n: r["status"] for n, r in report.data["sections"].items()}
    report.append(f"\n- wall time {report.data['header']['wall_s']} s; sections: "
                  + ", ".join(f"{n} {s}" for n, s in statuses.items()) + f"\n- written to {args.out}")
    return 0 if all(s == "done" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
