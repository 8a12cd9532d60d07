"""Deployment: run a trained encoder where the images are, and export it to run without privenc.

The encoder is meant to run before images are shared (Sec. 1 of the paper: only encodings
leave the device), so it must be usable away from the training code:

- :func:`encode` turns a folder or CSV list of images into sharded ``.npy`` encodings plus a
  manifest, resumably (finished shards are kept and skipped on a rerun);
- :func:`export` writes a standalone ONNX, TorchScript or safetensors encoder with its input
  contract in a JSON file beside it.

Both apply the encoder in eval mode: its per-location batch norms use their running
statistics, so an encoding is a fixed function of one image, independent of the batch it
was computed in. Images go through exactly the evaluation path of training
(:func:`~privenc.data.images.read_image`, :func:`~privenc.data.images.resize_square` to
``data.load_size``, :func:`~privenc.data.transforms.eval_transform`).

Output folder of ``encode`` (see docs/deploy.md):
    encode.json                  encoder sha256 + options; a rerun with others is refused
    shard-00000.npy              float32 [n, C, H, W], the readable images of shard 0, in order
    shard-00000.jsonl            manifest part of shard 0 (one line per input, errors included)
    manifest.jsonl               all parts concatenated, written once every shard is done
    previews/preview-00000.png   optional: rows of shard 0, histogram-equalized over the shard
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from tqdm.auto import tqdm

from privenc import __version__
from privenc import checkpoint as ckpt
from privenc.config import ConfigError, DataConfig, EncoderConfig, build_section, load_config
from privenc.data.base import DataError
from privenc.data.images import IMAGE_EXTENSIONS, read_image, resize_square
from privenc.data.manifest import PATH_COLUMN, read_csv, relative_path
from privenc.data.transforms import eval_transform
from privenc.models import Encoder
from privenc.report import equalize
from privenc.train import ENCODER_FILE, load_encoder, resolve_device

log = logging.getLogger(__name__)

ENCODE_FORMAT = 1
ENCODE_FILE = "encode.json"
MANIFEST_FILE = "manifest.jsonl"
PREVIEW_DIR = "previews"
SHARD_DTYPE = np.float32
"""Encodings are stored as float32: exactly what the encoder computed (float16 would halve
the size but round tanh outputs near +-1 to steps of 2**-11, about 5e-4)."""

FORMATS = ("onnx", "torchscript", "safetensors")
EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
ONNX_OPSET = 17
EXPORT_TOLERANCE = 1e-4
"""Largest absolute difference allowed between an export and the PyTorch encoder."""
CONTRACT_KEY = "privenc_contract"
"""safetensors metadata key holding the contract (metadata values must be strings)."""


class ExportError(RuntimeError):
    """An exported encoder that does not reproduce the PyTorch encoder."""


# --------------------------------------------------------------------------- loading an encoder


@dataclass
class Deployable:
    """A loaded encoder (eval mode) and what its input contract needs besides its weights."""

    encoder: Encoder
    load_size: int
    """Images are resized (shorter side) and center-cropped to this before the final crop."""
    path: Path
    """The file the weights came from (encoder.pt or an exported .safetensors)."""
    sha256: str
    encoder_config: dict[str, Any]
    step: int | None


def open_encoder(path: Path | str, device: str | torch.device = "cpu") -> Deployable:
    """Load an encoder from a run folder, an ``encoder.pt`` inside one, or an exported
    ``.safetensors``; strict loading, and every unusable file is a CheckpointError naming it.

    A run's ``config.toml`` supplies ``data.load_size`` (the resize before the crop) and must
    agree with the encoder file on the architecture and the input size: a folder whose two
    files disagree would otherwise encode with the wrong contract.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        encoder, contract = load_safetensors(path, device)
        return Deployable(encoder, int(contract["input"]["load_size"]), path, file_sha256(path),
                          contract["encoder_config"], contract.get("step"))
    run_dir, file = (path, path / ENCODER_FILE) if path.is_dir() else (path.parent, path)
    try:
        encoder = load_encoder(file, device)
    except (KeyError, TypeError, ValueError) as err:  # ValueError includes ConfigError
        raise ckpt.CheckpointError(f"{file}: not a usable encoder file ({type(err).__name__}: {err})") from None
    payload = ckpt.load(file)  # load_encoder keeps its metadata to itself; an encoder file is small
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise ckpt.CheckpointError(
            f"{file}: no config.toml beside it; the run's config gives the input contract "
            f"(data.load_size). Pass the run folder, or export to .safetensors and use that"
        )
    config = load_config(str(config_path))
    if config.data.image_size != encoder.image_size or config.to_dict()["encoder"] != payload["encoder_config"]:
        raise ckpt.CheckpointError(
            f"{file} does not match {config_path}: encoder config {payload['encoder_config']} at "
            f"{encoder.image_size}px vs {config.to_dict()['encoder']} at {config.data.image_size}px"
        )
    return Deployable(encoder, config.data.load_size, file, file_sha256(file),
                      payload["encoder_config"], int(payload.get("step", 0)))


def load_safetensors(path: Path | str, device: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild an :class:`Encoder` (eval mode, strict) from an exported ``.safetensors`` file;
    returns it with the input contract stored in the file's metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ckpt.CheckpointError(f"encoder file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ckpt.CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    if CONTRACT_KEY not in metadata:
        raise ckpt.CheckpointError(f"{path}: no {CONTRACT_KEY!r} metadata; not exported by privenc")
    try:
        contract = json.loads(metadata[CONTRACT_KEY])
        encoder_cfg = build_section("encoder", EncoderConfig, contract["encoder_config"])
        encoder = Encoder(encoder_cfg, int(contract["input"]["image_size"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"{path}: unusable contract metadata ({type(err).__name__}: {err})") from None
    ckpt.load_state(encoder, state, f"{path}: encoder")
    return encoder.to(device).eval(), contract


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_contract(model: Deployable) -> dict[str, Any]:
    """What a caller must feed the encoder and what comes out (recorded with every export
    and every encoded folder)."""
    size, load = model.encoder.image_size, model.load_size
    channels, height, width = model.encoder.output_shape
    return {
        "input": {
            "name": "image",
            "shape": ["batch", model.encoder.in_channels, size, size],
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "value_range": [-1.0, 1.0],
            "normalization": "(x / 255 - 0.5) / 0.5 for uint8 pixel values x",
            "load_size": load,
            "image_size": size,
            "resize_crop": (
                f"decode to RGB (EXIF orientation applied, alpha dropped); resize so the shorter "
                f"side is {load} (bilinear, antialiased) and center-crop {load}x{load}; then "
                f"center-crop {size}x{size}"
            ),
        },
        "output": {
            "name": "encoding",
            "shape": ["batch", channels, height, width],
            "dtype": "float32",
            "value_range": [-1.0, 1.0],
        },
        "mode": "eval: per-location batch norms use their running statistics, so each "
                "encoding is a fixed function of its own image",
        "encoder_config": model.encoder_config,
        "step": model.step,
        "privenc_version": __version__,
        "source_file": str(model.path),
        "source_sha256": model.sha256,
    }


# --------------------------------------------------------------------------- listing the inputs


def list_inputs(inputs: Path | str, exclude: Path | None = None) -> tuple[Path, list[str], str]:
    """(root, paths relative to root, kind) of the images to encode.

    A folder: every file below it with an image extension, recursively, sorted by path;
    hidden files and folders are skipped (as folder sources do), and so is ``exclude`` (the
    output folder, when it sits inside the input: its previews are not inputs). A CSV file:
    its ``path`` column, relative to the CSV's folder, in file order.
    """
    inputs = Path(inputs)
    if inputs.is_dir():
        skip = exclude.resolve() if exclude is not None else None
        found = []
        for dirpath, dirnames, filenames in os.walk(inputs):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")
                           and (skip is None or Path(dirpath, d).resolve() != skip)]
            rel_dir = Path(dirpath).relative_to(inputs).as_posix()
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        if not found:
            raise DataError(f"no images under {inputs} (looked for {'/'.join(IMAGE_EXTENSIONS)} files)")
        return inputs, sorted(found), "folder"
    if inputs.is_file() and inputs.suffix.lower() == ".csv":
        header, rows = read_csv(inputs)
        if PATH_COLUMN not in header:
            raise DataError(f"{inputs}: no {PATH_COLUMN!r} column; columns are {', '.join(header) or '(none)'}")
        column = header.index(PATH_COLUMN)
        paths, first_line = [], {}
        for lineno, row in rows:
            if not row[column]:
                raise DataError(f"{inputs}:{lineno}: empty cell in column {PATH_COLUMN!r}")
            rel = relative_path(row[column], inputs, lineno)
            if rel in first_line:
                raise DataError(f"{inputs}:{lineno}: duplicated path {row[column]!r} (also on line {first_line[rel]})")
            first_line[rel] = lineno
            paths.append(rel)
        if not paths:
            raise DataError(f"{inputs}: no rows after the header")
        return inputs.parent, paths, "csv"
    raise DataError(f"input {inputs} is neither a folder of images nor a .csv file with a {PATH_COLUMN!r} column")


class _ImageFiles(torch.utils.data.Dataset):
    """Item k -> (float32 (3, S, S) in [-1, 1] or None, error message or None): training's
    evaluation path (decode, resize_square to load_size, eval_transform), one file at a time."""

    def __init__(self, root: Path, paths: list[str], data_cfg: DataConfig) -> None:
        self.root, self.paths, self.load_size = root, paths, data_cfg.load_size
        self.transform = eval_transform(data_cfg)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            image = resize_square(read_image(self.root / self.paths[k]), self.load_size)  # (L, L, 3) uint8
        except DataError as err:
            return None, str(err)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, L, L)
        return self.transform(tensor), None


def _as_list(batch: list) -> list:
    return batch


# --------------------------------------------------------------------------- encode


def encode(
    encoder_path: Path | str,
    inputs: Path | str,
    out_dir: Path | str,
    shard_size: int = 1024,
    batch_size: int = 64,
    device: str = "auto",
    previews: int = 0,
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Encode every image of ``inputs`` (a folder or a CSV) into ``out_dir``; returns a summary.

    Shards of ``shard_size`` inputs are written atomically (.npy, then its manifest part); a
    rerun skips shards whose two files exist. Unreadable images are listed in the manifest
    with ``status: "error"`` and counted, never dropped silently. ``encode.json`` records the
    encoder's sha256 and the options that shape the output (input listing, shard size, dtype,
    input contract); a rerun into the same folder with others is refused. ``batch_size``,
    ``device``, ``num_workers`` and ``previews`` do not change the shards and may differ.
    """
    if shard_size < 1 or batch_size < 1 or previews < 0 or num_workers < 0:
        raise ConfigError(f"need shard_size >= 1, batch_size >= 1, previews >= 0 and num_workers >= 0; got "
                          f"{shard_size}, {batch_size}, {previews}, {num_workers}")
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    model = open_encoder(encoder_path, torch_device)
    root, paths, kind = list_inputs(inputs, exclude=out_dir)
    contract = input_contract(model)
    options = {
        "input_kind": kind,
        "images": len(paths),
        "listing_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "shard_size": shard_size,
        "dtype": np.dtype(SHARD_DTYPE).name,
        "load_size": model.load_size,
        "image_size": model.encoder.image_size,
    }
    _claim_output(out_dir, {"format": ENCODE_FORMAT, "encoder_sha256": model.sha256, "options": options,
                            "encoder": str(model.path), "input": str(Path(inputs).resolve()),
                            "contract": contract})

    data_cfg = DataConfig(image_size=model.encoder.image_size, load_size=model.load_size)
    n_shards = math.ceil(len(paths) / shard_size)
    bar = tqdm(total=len(paths), disable=not progress, desc="encode", unit="img", dynamic_ncols=True)
    parts: list[list[dict[str, Any]]] = []
    written = 0
    for k in range(n_shards):
        first = k * shard_size
        chunk = paths[first:first + shard_size]
        records = _finished_shard(out_dir, k, first, chunk, model.encoder.output_shape)
        if records is None:
            encodings, records = _encode_shard(model.encoder, _ImageFiles(root, chunk, data_cfg), k, first,
                                               batch_size, num_workers, torch_device, bar)
            _write_shard(out_dir, k, encodings, records)
            written += 1
        else:
            bar.update(len(chunk))
        parts.append(records)
    bar.close()

    # ---- the manifest, once every shard is done; then previews and the summary
    lines = [record for part in parts for record in part]
    ckpt.atomic_write_text(out_dir / MANIFEST_FILE, "".join(json.dumps(r) + "\n" for r in lines))
    preview_paths = _write_previews(out_dir, previews) if previews else []
    errors = [r for r in lines if r["status"] == "error"]
    if errors:
        log.warning("%d of %d images could not be read, e.g. %s (listed in %s)",
                    len(errors), len(lines), errors[0]["error"], out_dir / MANIFEST_FILE)
    return {
        "images": len(lines),
        "encoded": len(lines) - len(errors),
        "errors": len(errors),
        "shards": n_shards,
        "shards_written": written,
        "shards_reused": n_shards - written,
        "previews": len(preview_paths),
        "out_dir": str(out_dir),
        "manifest": str(out_dir / MANIFEST_FILE),
    }


def _claim_output(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``encode.json`` into a new or empty folder, or check that the one there matches:
    shards written by another encoder or with other options must never be mixed."""
    path = out_dir / ENCODE_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: unreadable ({err}); use a new output folder") from None
        if old.get("encoder_sha256") != record["encoder_sha256"]:
            raise ConfigError(
                f"refusing to encode into {out_dir}: it holds encodings by another encoder "
                f"({old.get('encoder')}, sha256 {str(old.get('encoder_sha256'))[:12]}...) than "
                f"{record['encoder']} (sha256 {record['encoder_sha256'][:12]}...); use a new output folder"
            )
        changed = [f"{key}: {old.get('options', {}).get(key)!r} -> {value!r}"
                   for key, value in record["options"].items() if old.get("options", {}).get(key) != value]
        if changed:
            raise ConfigError(f"refusing to encode into {out_dir} with other options than its {ENCODE_FILE} "
                              f"records; use a new output folder:\n  " + "\n  ".join(changed))
        return
    # (a temporary file left by a run killed while it wrote encode.json is not a result)
    if out_dir.exists() and any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out_dir.iterdir()):
        raise ConfigError(f"refusing to encode into {out_dir}: it is not empty and has no {ENCODE_FILE}")
    ckpt.atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def _finished_shard(out_dir: Path, k: int, first: int, chunk: list[str],
                    output_shape: tuple[int, int, int]) -> list[dict[str, Any]] | None:
    """The manifest part of shard ``k`` if both its files exist (it is done), else None.
    A done shard is checked against what it should hold, cheaply (the .npy header only)."""
    array_path = out_dir / f"{_shard_name(k)}.npy"
    part_path = out_dir / f"{_shard_name(k)}.jsonl"
    if not (array_path.is_file() and part_path.is_file()):
        return None
    records = [json.loads(line) for line in part_path.read_text().splitlines() if line.strip()]
    if [r["path"] for r in records] != chunk or records[0]["index"] != first:
        raise DataError(f"{part_path} lists other images than shard {k} should hold; "
                        f"delete it and {array_path.name} to re-encode that shard")
    shape = np.load(array_path, mmap_mode="r").shape
    ok = sum(r["status"] == "ok" for r in records)
    if shape != (ok, *output_shape):
        raise DataError(f"{array_path} has shape {shape}, expected {(ok, *output_shape)}; delete it to re-encode")
    return records


def _encode_shard(encoder: Encoder, files: _ImageFiles, k: int, first: int, batch_size: int,
                  num_workers: int, device: torch.device, bar) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Encodings of the readable images of one shard, in order, and one record per input."""
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_as_list)
    shard = f"{_shard_name(k)}.npy"
    encodings: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    rows = 0
    for batch in loader:
        images = [image for image, _ in batch if image is not None]
        if images:
            with torch.inference_mode():
                out = encoder(torch.stack(images).to(device))  # (B, C, H, W)
            encodings.append(out.float().cpu().numpy().astype(SHARD_DTYPE))
        for image, error in batch:
            index = first + len(records)
            if image is None:
                records.append({"index": index, "path": files.paths[index - first], "status": "error",
                                "shard": None, "row": None, "error": error})
            else:
                records.append({"index": index, "path": files.paths[index - first], "status": "ok",
                                "shard": shard, "row": rows})
                rows += 1
        bar.update(len(batch))
    empty = np.zeros((0, *encoder.output_shape), dtype=SHARD_DTYPE)
    return (np.concatenate(encodings) if encodings else empty), records


def _write_shard(out_dir: Path, k: int, encodings: np.ndarray, records: list[dict[str, Any]]) -> None:
    """The .npy first, then the manifest part: the part's existence marks the shard done."""
    buffer = io.BytesIO()
    np.save(buffer, encodings)
    ckpt.atomic_write_bytes(out_dir / f"{_shard_name(k)}.npy", buffer.getvalue())
    ckpt.atomic_write_text(out_dir / f"{_shard_name(k)}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _write_previews(out_dir: Path, count: int) -> list[Path]:
    """PNGs of the first ``count`` encodings of shard 0, histogram-equalized per location and
    channel over the whole shard (as the report's Figure 3 shows encodings)."""
    encodings = np.load(out_dir / f"{_shard_name(0)}.npy")  # (n, C, H, W)
    if len(encodings) == 0:
        return []
    shown = equalize(encodings)[:count]
    paths = []
    for i, encoding in enumerate(shown):
        path = out_dir / PREVIEW_DIR / f"preview-{i:05d}.png"
        ckpt.atomic_write_bytes(path, _png(encoding))
        paths.append(path)
    return paths


def _png(encoding: np.ndarray) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes: RGB for 3 channels, else channels side by side in
    gray; enlarged (nearest) so a 28x28 encoding shows at 112 px."""
    pixels = (np.clip(encoding, 0, 1) * 255).round().astype(np.uint8)
    channels, height, width = pixels.shape
    if channels == 3:
        image = Image.fromarray(pixels.transpose(1, 2, 0), "RGB")
    else:
        image = Image.fromarray(np.concatenate(list(pixels), axis=1), "L")  # (H, C * W)
    scale = max(1, 112 // max(height, width))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- export


def export(encoder_path: Path | str, fmt: str, out_path: Path | str | None = None) -> Path:
    """Write a standalone encoder (``onnx``, ``torchscript`` or ``safetensors``) and its
    contract ``<out>.json``; returns the path of the encoder file.

    Default ``out_path``: beside the source file, ``encoder.onnx`` / ``encoder.torchscript.pt``
    / ``encoder.safetensors``. The export is checked against the PyTorch encoder on random
    images at batch sizes 1 and 5 (ONNX needs onnxruntime for that) before anything is
    written; the result is recorded in the contract.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    model = open_encoder(encoder_path, "cpu")
    out = Path(out_path) if out_path else model.path.with_name("encoder" + EXPORT_SUFFIX[fmt])
    if out.resolve() == model.path.resolve():
        raise ConfigError(f"refusing to export {model.path} over itself; pass another --out")
    if out.exists() and not _is_export(out, fmt):
        raise ConfigError(f"refusing to overwrite {out}: it is not an earlier {fmt} export "
                          f"(no {contract_path(out).name} contract beside it); choose another --out or remove it")
    contract = {"format": fmt, "file": out.name, **input_contract(model)}
    if fmt == "onnx":
        data = _onnx_bytes(model.encoder)
        contract["onnx_opset"] = ONNX_OPSET
    elif fmt == "torchscript":
        data = _torchscript_bytes(model.encoder)
    else:
        data = _safetensors_bytes(model.encoder, contract)
    contract["check"] = _check_export(data, fmt, model)
    # Contract first: an export killed between the two writes leaves a file a rerun may replace
    # (a contract beside it), never a contract-less file that the rerun would refuse to touch.
    ckpt.atomic_write_text(contract_path(out), json.dumps(contract, indent=2) + "\n")
    ckpt.atomic_write_bytes(out, data)
    log.info("exported %s to %s (contract %s)", model.path, out, contract_path(out))
    return out


def _is_export(path: Path, fmt: str) -> bool:
    """Whether ``path`` is a file written by :func:`export` in ``fmt`` (which a new export may replace)."""
    try:
        contract = json.loads(contract_path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return path.is_file() and isinstance(contract, dict) and contract.get("format") == fmt


def contract_path(exported: Path) -> Path:
    """Where the contract of an exported file lives: ``encoder.onnx`` -> ``encoder.onnx.json``."""
    return exported.with_name(exported.name + ".json")


def _example(encoder: Encoder, batch: int) -> torch.Tensor:
    """Seeded random images in the input range, (batch, 3, S, S)."""
    generator = torch.Generator().manual_seed(batch)
    size = encoder.image_size
    return torch.rand(batch, encoder.in_channels, size, size, generator=generator) * 2 - 1


def _onnx_bytes(encoder: Encoder) -> bytes:
    """ONNX with a dynamic batch axis, by the TorchScript-based exporter (``dynamo=False``):
    the torch.export-based default of torch >= 2.9 needs the onnxscript package, which
    privenc does not depend on, and the legacy exporter reproduces this all-conv network."""
    _require_module("onnx", "ONNX export")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The input-shape check in PerLocationBatchNorm.forward is traced as a constant:
        # correct, since the contract fixes C, H and W and only the batch axis varies.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The deprecation of this exporter is the trade-off named above.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(encoder, (_example(encoder, 2),), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["encoding"],
                          dynamic_axes={"image": {0: "batch"}, "encoding": {0: "batch"}})
    return buffer.getvalue()


def _torchscript_bytes(encoder: Encoder) -> bytes:
    """TorchScript by tracing (``torch.jit.script`` cannot compile the shape check of
    PerLocationBatchNorm); the traced graph has no data-dependent control flow."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # as in _onnx_bytes
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; still the portable format
        traced = torch.jit.trace(encoder, _example(encoder, 2))
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _safetensors_bytes(encoder: Encoder, contract: dict[str, Any]) -> bytes:
    _require_module("safetensors", "safetensors export")
    from safetensors.torch import save

    state = {key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()}
    return save(state, metadata={CONTRACT_KEY: json.dumps(contract)})


def _check_export(data: bytes, fmt: str, model: Deployable) -> dict[str, Any]:
    """Run the exported bytes on random images at batch sizes 1 and 5 (the dynamic batch
    axis) and compare with the PyTorch encoder; an export off by more than
    EXPORT_TOLERANCE is an ExportError, never written."""
    encoder = model.encoder
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return {"skipped": "onnxruntime is not installed"}
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        def run(x):
            return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(io.BytesIO(data))
        run = module
    else:
        from safetensors.torch import load

        rebuilt = Encoder(build_section("encoder", EncoderConfig, model.encoder_config), encoder.image_size)
        ckpt.load_state(rebuilt, load(data), "safetensors export")
        run = rebuilt.eval()
    diffs = []
    for batch in (1, 5):
        x = _example(encoder, batch)
        with torch.inference_mode():
            diffs.append(float((run(x) - encoder(x)).abs().max()))
    if max(diffs) > EXPORT_TOLERANCE:
        raise ExportError(f"the {fmt} export differs from the PyTorch encoder by {max(diffs):.2e} "
                          f"(> {EXPORT_TOLERANCE}); nothing was written")
    return {"batch_sizes": [1, 5], "max_abs_diff": max(diffs), "tolerance": EXPORT_TOLERANCE}


def _require_module(name: str, what: str) -> None:
    try:
        __import__(name)
    except ImportError:
        raise ConfigError(f"{what} needs the {name!r} package: pip install 'privenc[export]'") from None


# --------------------------------------------------------------------------- command line


def cmd_encode(args: argparse.Namespace) -> int:
    summary = encode(args.encoder, args.input, args.output, shard_size=args.shard_size,
                     batch_size=args.batch_size, device=args.device, previews=args.previews,
                     progress=not args.no_progress, num_workers=args.workers)
    print(f"encoded {summary['encoded']} of {summary['images']} images into {summary['shards']} shard(s) "
          f"({summary['shards_reused']} reused), {summary['errors']} error(s); manifest: {summary['manifest']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        path = export(args.encoder, args.format, args.out)
    except ExportError as err:
        print(f"privenc: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {path}; input contract: {contract_path(path)}")
    return 0


def add_deploy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``encode`` and ``export`` on the ``privenc`` command line."""
    source_help = ("a training run folder (encoder.pt + config.toml), an encoder.pt inside one, or an "
                   "exported .safetensors")
    p = subparsers.add_parser(
        "encode", help="encode a folder or CSV list of images into sharded .npy files (resumable)",
        description="Encode every image with a trained encoder (evaluation transform: resize to the "
                    "run's data.load_size, center crop to data.image_size, values in [-1, 1]) into "
                    "OUT/shard-NNNNN.npy (float32 [n, C, H, W]) plus OUT/manifest.jsonl mapping each "
                    "source path to (shard, row); unreadable images are listed there with status "
                    "'error'. A rerun skips finished shards; a rerun with another encoder or other "
                    "input/shard size into the same OUT is refused (OUT/encode.json records them).")
    p.add_argument("--encoder", required=True, metavar="RUN", help=source_help)
    p.add_argument("--input", required=True, metavar="DIR|CSV",
                   help="a folder (every image below it, recursively, sorted by path) or a CSV file "
                        "whose 'path' column lists images relative to the CSV")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (new, empty, or a previous "
                                                                   "encode of the same input to resume)")
    p.add_argument("--shard-size", type=int, default=1024, metavar="N", help="inputs per shard (default 1024)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--previews", type=int, default=0, metavar="N",
                   help="write PNGs of the first N encodings, histogram-equalized per location and "
                        "channel over the first shard, to OUT/previews/ (default 0)")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes decoding images (default 0: decode in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_encode)

    p = subparsers.add_parser(
        "export", help="export a trained encoder to ONNX, TorchScript or safetensors",
        description="Write a standalone encoder (eval mode: a fixed per-image function) and, beside "
                    "it, PATH.json: the input contract (size, RGB, [-1, 1] = (x/255-0.5)/0.5, "
                    "resize/crop rule), output shape, encoder config, privenc version and the "
                    "source file's sha256. The export is checked against the PyTorch encoder "
                    "(batch sizes 1 and 5, max abs diff <= 1e-4) before it is written.")
    p.add_argument("--encoder", required=True, metavar="RUN", help=source_help)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (dynamic batch axis, opset 17), torchscript (traced) or safetensors "
                        "(state dict + contract; rebuild with privenc.deploy.load_safetensors)")
    p.add_argument("--out", metavar="PATH", help="output file (default: beside the encoder file, "
                                                 "encoder.onnx / encoder.torchscript.pt / encoder.safetensors)")
    p.set_defaults(func=cmd_export)
