"""Performance benchmarks of privenc: ``make bench`` (this file) prints a table and writes
docs/performance.md.

    python benchmarks/run.py                  # the full run (about 10 minutes on 2 CPU cores)
    python benchmarks/run.py --quick          # a smoke run: every benchmark, tiny sizes, 1 repeat
    python benchmarks/run.py --section loading --section attackers --repeats 7 --out /tmp/perf.md

Every comparison runs its variants interleaved and repeated, most in this one process (see
measure.py); numbers are medians and ratios of medians within the run. The GPU half of the
targets is measured by benchmarks/gpu_check.py on a CUDA machine; here, --device cuda runs it.
"""

from __future__ import annotations

import os

# As the privenc command line does (privenc.cli.main): sleeping OpenMP threads (OpenMP reads the
# variable once, when torch loads it, so before torch is imported) and glibc's malloc keeping
# freed blocks (privenc/runtime.py).
from privenc.runtime import keep_freed_memory, tune_process  # noqa: E402  (imports no torch)

tune_process()

import argparse
import datetime
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from privenc.data.cache import default_cache_dir

import fixtures
import flops
from measure import Section, git_revision, load_average, machine, one_minute_load
from tables import median_of, table, targets, write_report

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("flops", "training", "layout", "threads", "encoding", "attackers", "loading")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per comparison (default 5; "
                                                                  "quick: 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md", help="report file")
    parser.add_argument("--device", default="cpu", help="cpu (default), or cuda: run benchmarks/gpu_check.py")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--paper-batch", type=int, default=2,
                        help="batch of the paper preset's CPU iteration (default 2; the preset's is 128)")
    parser.add_argument("--paper-attack-batch", type=int, default=8,
                        help="attacker batch of the paper preset's (c) comparison on a CPU (default 8; the "
                             "preset's is 128)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="image caches (default: privenc's, $PRIVENC_CACHE or ~/.cache/privenc)")
    parser.add_argument("--section", action="append", default=[], metavar="NAME",
                        help=f"run this section only (repeatable, or comma-separated): {', '.join(SECTIONS)}; "
                             f"default: all")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.device != "cpu":
        import gpu_check

        return gpu_check.main(["--device", args.device] + (["--quick"] if args.quick else []))
    if args.threads:
        torch.set_num_threads(args.threads)
    only = {name for item in args.section for name in item.split(",")} or set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    quick = args.quick
    repeats = args.repeats or (1 if quick else 5)
    cache_dir = args.cache_dir or default_cache_dir()
    started, load_before, one_before = time.time(), load_average(), one_minute_load()
    command = " ".join(["python", "benchmarks/run.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    print(f"# {command}  ({repeats} interleaved repeats, {torch.get_num_threads()} torch threads)", flush=True)

    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="privenc-bench-") as tmp:
        tmp_dir = Path(tmp)
        demo = fixtures.demo_config(cache_dir)
        demo_data = fixtures.prepare_data(demo)
        demo_jpegs = {s: fixtures.jpeg_files(demo_data, demo_data.indices[s], tmp_dir / "jpeg")
                      for s in ("train", "val", "test")}
        paper = fixtures.paper_config(cache_dir, args.paper_batch)
        paper_data = fixtures.prepare_data(paper) if only & {"training", "layout", "loading", "attackers"} else None

        def run(title: str, fn, *a, **kw) -> Section:
            t0 = time.time()
            print(f"## {title} ...", flush=True)
            section = Section(title, fn(*a, **kw))
            print(table(section.rows), f"\n({time.time() - t0:.0f} s)\n", flush=True)
            sections.append(section)
            return section

        if "flops" in only:
            sections.append(flops_section(fixtures.paper_config(cache_dir, 128)))
        if "training" in only:
            import training

            run("(a) adversarial iteration, demo preset", training.adversarial_iteration, "demo", demo, demo_data,
                demo_jpegs["train"], repeats, iters=1 if quick else 3)
            paper_jpegs = fixtures.jpeg_files(paper_data, paper_data.indices["train"], tmp_dir / "jpeg-paper")
            section = run("(a) adversarial iteration, paper preset", training.adversarial_iteration,
                          f"paper (batch {args.paper_batch}, CPU)", paper, paper_data, paper_jpegs,
                          min(repeats, 3), iters=1)
            section.notes.append(f"Paper preset on a CPU: batch {args.paper_batch} instead of 128 and one iteration "
                                 f"per run, {min(repeats, 3)} runs, so that it fits in minutes; "
                                 f"{fixtures.paper_data_note()}.")
        if "layout" in only:
            import attackers
            import layout

            run("CPU memory format, training", layout.adversarial_iteration, "demo", demo, demo_data, repeats,
                iters=1 if quick else 3)
            run("CPU memory format, training (paper)", layout.adversarial_iteration,
                f"paper (batch {args.paper_batch}, CPU)", paper, paper_data, min(repeats, 3), iters=1)
            run("CPU memory format, Identity attacker", layout.attacker, "raw images (Identity)", demo,
                layout.raw_images(demo, demo_data), repeats, iters=5 if quick else 20)
            run("CPU memory format, attacker on encodings", layout.attacker, "demo encodings", demo,
                attackers.encode(demo, demo_data), repeats, iters=20 if quick else 100)
        if "threads" in only:
            import training

            section = run("CPU thread settings", training.thread_settings, cache_dir, min(repeats, 3),
                          iters=1 if quick else 2, batch_size=demo.train.batch_size)
            best = max(section.rows, key=lambda r: r.median)
            section.notes.append(f"Fastest setting in this run: {best.variant.replace(' (baseline)', '')} "
                                 f"({best.median:.3g} iterations/s, {best.ratio or 1:.2f}x the torch defaults).")
            run("CPU allocator", training.allocator_settings, cache_dir, repeats,
                iters=1 if quick else 6, batch_size=demo.train.batch_size)
        if "encoding" in only:
            import encoding

            run("(b) encoding", encoding.encoding, "demo", demo, demo_data, demo_jpegs, repeats)
        if "attackers" in only:
            import attackers

            encoded = attackers.encode(demo, demo_data)  # verify.views augmented views, as verification does
            for family in ("paper",) if quick else ("paper", "mlp", "linear"):
                section = run(f"(c) attacker training, demo, {family}", attackers.cached_vs_reencoding, "demo",
                              demo, demo_data, encoded, demo_jpegs["train"], repeats,
                              cached_iters=10 if quick else 60, naive_iters=2 if quick else 6, family=family,
                              from_cache=family == "paper")
                section.notes.append(bound_note(demo, family, demo.verify.batch_size))
            paper_attack = fixtures.paper_config(cache_dir, args.paper_batch,
                                                 f"verify.batch_size={args.paper_attack_batch}")
            section = run("(c) attacker training, paper", attackers.cached_vs_reencoding,
                          "paper (CPU)", paper_attack, paper_data,
                          attackers.stand_in_encodings(paper_attack, 256),
                          fixtures.jpeg_files(paper_data, paper_data.indices["train"],
                                              tmp_dir / "jpeg-paper"),
                          min(repeats, 3), cached_iters=10 if quick else 60, naive_iters=1, from_cache=False)
            section.notes.append(bound_note(paper_attack, "paper", paper_attack.verify.batch_size))
            section.notes.append(f"Paper preset on a CPU: attacker batch {args.paper_attack_batch} (the preset's is "
                                 f"128), one re-encoding iteration per run, 60 cached ones (fit_classifier with "
                                 f"its final evaluations, which a real run spreads over far more iterations: "
                                 f"with 10 they were most of the time measured); the cached side trains on random "
                                 f"encodings of the encoder's output shape (3x28x28: the cost does not depend "
                                 f"on the values); {fixtures.paper_data_note()}.")
            run("several attackers: processes", attackers.processes_vs_threads, demo, encoded, min(repeats, 3),
                iters=5 if quick else 30, cores=min(2, os.cpu_count() or 1))
            run("several attackers: vectorized", attackers.vectorized, demo, encoded, repeats,
                iters=2 if quick else 10, counts=(4,) if quick else (4, 16))
        if "loading" in only:
            import loading

            jpegs = fixtures.jpeg_files(paper_data, paper_data.images.indices, tmp_dir / "jpeg-paper")
            section = run("(d) loading", loading.loading, paper_data, jpegs, repeats)
            section.notes.append(f"{len(jpegs)} images, batches of 64, DataLoader in the main process "
                                 f"(data.num_workers = 0, the default); {fixtures.paper_data_note()}.")

    wall = time.time() - started
    header = run_header(command, repeats, wall, load_before, one_before)
    write_report(args.out, sections, header, static_text(sections))
    rows = [r for s in sections for r in s.rows]
    print(table(rows))
    print("\n".join(targets(rows)))
    print(f"\nwall time {wall:.0f} s; report written to {args.out}")
    return 0


def flops_section(config) -> Section:
    counts = flops.iteration_flops(config)
    section = Section("FLOPs per training iteration, paper preset")
    per_image = counts["total"] / counts["images"]
    ceiling = 989e12 / counts["total"]
    section.notes += [
        f"Paper preset, batch {config.train.batch_size} at {config.data.image_size}x{config.data.image_size}: "
        f"classifier step {counts['classifier_step'] / 1e12:.2f} TFLOP + encoder step "
        f"{counts['encoder_step'] / 1e12:.2f} TFLOP = **{counts['total'] / 1e12:.2f} TFLOP per iteration** "
        f"({counts['images']:.0f} images, {per_image / 1e9:.1f} GFLOP per image; FlopCounterMode, forward and "
        f"backward, 2 FLOPs per multiply-add).",
        f"Against the dense bf16 peak of an H100 SXM / H200 (989 TFLOP/s): at most {ceiling:.1f} iterations/s; "
        f"40% of peak is {0.4 * ceiling:.1f} iterations/s, which asks the loader for "
        f"{0.4 * ceiling * counts['images']:,.0f} images/s.",
    ]
    print("\n".join(section.notes), flush=True)
    return section


def bound_note(config, family: str, batch: int) -> str:
    b = flops.reencoding_bound(config, family, batch)
    return (f"'{family}' attacker, batch {batch}: encoding the batch costs {b['encode'] / 1e9:.3g} GFLOP, an "
            f"attacker step {b['attacker_step'] / 1e9:.3g} GFLOP (forward + backward), so by FLOPs alone training "
            f"on cached encodings can be at most {b['bound']:,.1f}x faster than re-encoding; data loading adds "
            f"to the re-encoding side, per-step overheads to both.")


def run_header(command: str, repeats: int, wall: float, load_before: str, one_before: float | None) -> list[str]:
    info = machine()
    lines = [f"- command: `{command}` ({repeats} interleaved repeats per comparison unless its row says fewer; "
             f"wall time {wall:.0f} s)",
             f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- commit: {git_revision()} (the code measured; the commit that adds this file comes after it)",
             *[f"- {key}: {value}" for key, value in info.items()],
             "- device: cpu" + ("" if not torch.cuda.is_available() else " (a GPU is present; see gpu_check.py)"),
             f"- OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} in this process (the privenc "
             f"command line sets PASSIVE unless the variable is set)",
             f"- malloc tuning (privenc/runtime.py): {'applied' if keep_freed_memory() else 'not applied'} in this "
             f"process, as in the privenc command line",
             f"- load average before / after: {load_before} / {load_average()}"]
    # Busy if something else ran: load before the run, or more load at its end than this
    # process's own threads account for (the 1-minute average then counts the benchmark itself).
    after = one_minute_load()
    busy = ((one_before is not None and one_before > 0.5)
            or (after is not None and after > torch.get_num_threads() + 0.5))
    if busy:
        lines.append("- **Measured under load from other processes** (the load average above counts them: more "
                     "than 0.5 before the run, or more than this process's threads + 0.5 at its end): "
                     "absolute rates are lower and noisier than on an idle machine; the interleaved ratios "
                     "are the numbers to compare.")
    return lines


def static_text(sections: list[Section]) -> str:
    rows = [r for s in sections for r in s.rows]
    fastest_threads = [r for r in rows if r.benchmark.startswith("CPU threads")]
    thread_line = ""
    if fastest_threads:
        best = max(fastest_threads, key=lambda r: r.median)
        base = median_of(rows, "CPU threads", "intra-op 2, inter-op 2")
        thread_line = (f" In this run {best.variant.replace(' (baseline)', '')} was fastest at "
                       f"{best.median:.3g} iterations/s against {base:.3g} for the default.")
    return (Path(__file__).with_name("performance_notes.md").read_text()
            .replace("{THREADS_MEASURED}", thread_line))


if __name__ == "__main__":
    sys.exit(main())
