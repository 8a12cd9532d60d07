"""What a deployed encoder does with the batch it is given, and how far its exports are from it.

    python benchmarks/deploy_invariance.py                         # tiny, demo, places-mini, paper
    python benchmarks/deploy_invariance.py --presets tiny demo     # a subset, under a minute
    python benchmarks/deploy_invariance.py --batch-sizes 1 2 4 8 --no-export

For each encoder it prints one row of a Markdown table (the numbers in docs/deploy.md come
from this script):

- batch invariance: N seeded random images in [-1, 1] (N = the largest of ``--batch-sizes``)
  are encoded one at a time (the reference); then, for each batch size b, the first b of them
  are encoded as one batch. The column is the largest absolute difference between an image's
  encoding in a batch and its encoding alone, over all images and batch sizes (each batch
  size's own largest difference is printed below the table). The encoder is the one every
  deployment path uses: loaded from the run folder by ``privenc.deploy.open_encoder``, eval
  mode (its per-location batch norms use running statistics), under ``torch.inference_mode``,
  on the CPU, float32, NCHW.
- exports: ``privenc.deploy.export`` in each format (ONNX, TorchScript, safetensors), whose
  built-in check runs the exported file on seeded random images at batch sizes 1 and 5 and
  records the largest absolute difference from the PyTorch encoder; the columns are those
  recorded values (``check.max_abs_diff`` of each contract). ONNX needs onnx and onnxruntime.

The encoders are not trained. As in tests/test_deploy.py, the weights are seeded at random
(``--seed``) and the running statistics come from three training-mode passes over batches of
8 random images, so that they are not the defaults. "tiny" is the test suite's encoder (the
demo preset at 16x16 with stages [[4], [8]], tests/conftest.py's TINY); the others are the
presets as shipped. Each encoder is written to a temporary run folder (encoder.pt and
config.toml), which is removed at the end.

Time: the paper preset (224 px, 64-256 channels) is most of it, a few minutes on 2 CPU cores;
the other three take under a minute together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from privenc import deploy
from privenc.config import load_config
from privenc.models import Encoder
from privenc.runs import save_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine  # noqa: E402

# The encoder settings of tests/conftest.py's TINY (the rest of TINY does not touch the encoder).
TINY = ["data.image_size=16", "data.load_size=18", "encoder.stages=[[4], [8]]"]
PRESETS = {"tiny": ("demo", TINY), "demo": ("demo", []), "places-mini": ("places-mini", []),
           "paper": ("paper", [])}
FORMATS = ("onnx", "torchscript", "safetensors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS),
                        help="encoders to measure (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4, 7, 64],
                        help="batch sizes compared with one image at a time (default 1 2 3 4 7 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the images (default 0)")
    parser.add_argument("--no-export", action="store_true", help="batch invariance only")
    return parser.parse_args(argv)


def make_run(name: str, run_dir: Path, seed: int) -> Path:
    """A run folder holding an untrained encoder of preset ``name`` with non-default running statistics."""
    preset, overrides = PRESETS[name]
    config = load_config(preset, overrides)
    torch.manual_seed(seed)
    encoder = Encoder(config.encoder, config.data.image_size)
    size = config.data.image_size
    with torch.no_grad():
        for _ in range(3):
            encoder(torch.rand(8, 3, size, size) * 2 - 1)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(config.to_toml())
    save_encoder(run_dir / "encoder.pt", config, encoder, step=3)
    return run_dir


def batch_invariance(run_dir: Path, batch_sizes: list[int], seed: int) -> dict[int, float]:
    """Largest |encoding in a batch of b - encoding alone| per batch size b (the first b images)."""
    encoder = deploy.open_encoder(run_dir, "cpu").encoder
    size = encoder.image_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(max(batch_sizes), 3, size, size, generator=generator) * 2 - 1
    with torch.inference_mode():
        alone = torch.cat([encoder(x[i:i + 1]) for i in range(len(x))])
        return {b: float((encoder(x[:b]) - alone[:b]).abs().max()) for b in batch_sizes}


def export_diffs(run_dir: Path) -> dict[str, float | str]:
    """check.max_abs_diff of each export's contract (batch sizes 1 and 5)."""
    out: dict[str, float | str] = {}
    for fmt in FORMATS:
        path = deploy.export(run_dir, fmt, run_dir / f"encoder-export.{fmt}")
        check = json.loads(deploy.contract_path(path).read_text())["check"]
        out[fmt] = check.get("max_abs_diff", check.get("skipped", "?"))
    return out


def fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return "0" if value == 0 else f"{value:.1e}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    versions = [f"torch {torch.__version__}"]
    for module in ("onnx", "onnxruntime", "safetensors"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} not installed")
    command = " ".join(["python", "benchmarks/deploy_invariance.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# {command}")
    info = machine()
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# {info['cpu']}, {info['cores']} cores, {info['torch threads']}; load average {load} (1 / 5 / 15 min) "
          f"at the start; {', '.join(versions)}")
    print(f"# batch invariance: one batch of each size {' '.join(map(str, args.batch_sizes))} (the first images) "
          f"against one image at a time; exports: check.max_abs_diff at batch sizes 1 and 5\n")
    header = ["encoder", "input -> output", "batch sizes vs alone: max abs diff"]
    if not args.no_export:
        header += ["ONNX (onnxruntime)", "TorchScript", "safetensors rebuild"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    details = []
    with tempfile.TemporaryDirectory(prefix="privenc-deploy-invariance-") as tmp:
        for name in args.presets:
            t0 = time.time()
            run_dir = make_run(name, Path(tmp) / name, args.seed)
            config = load_config(str(run_dir / "config.toml"))
            shape = Encoder(config.encoder, config.data.image_size).output_shape
            diffs = batch_invariance(run_dir, args.batch_sizes, args.seed)
            cells = [f"`{name}`", f"{config.data.image_size} -> {shape[1]}x{shape[2]}x{shape[0]}",
                     fmt(max(diffs.values()))]
            if not args.no_export:
                cells += [fmt(v) for v in export_diffs(run_dir).values()]
            print("| " + " | ".join(cells) + " |", flush=True)
            details.append(f"# {name}: per batch size " + ", ".join(f"{b}: {fmt(d)}" for b, d in diffs.items())
                           + f"; {time.time() - t0:.1f} s")
    print("", *details, f"# {time.time() - started:.0f} s in all", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
