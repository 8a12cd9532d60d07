"""``privenc encode``: a folder or CSV list of images into sharded ``.npy`` encodings and a
manifest, resumably (finished shards are kept and skipped on a rerun)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from tqdm.auto import tqdm

from privenc.atomic import atomic_write_bytes, atomic_write_text
from privenc.config import DataConfig
from privenc.data.images import IMAGE_EXTENSIONS, read_image, resize_square
from privenc.data.manifest import PATH_COLUMN, read_csv, relative_path
from privenc.data.transforms import eval_transform
from privenc.deploy.contract import input_contract, open_encoder
from privenc.distributed import resolve_device
from privenc.errors import ConfigError, DataError
from privenc.figures import equalize
from privenc.models import Encoder

log = logging.getLogger(__name__)

ENCODE_FORMAT = 1
ENCODE_FILE = "encode.json"
MANIFEST_FILE = "manifest.jsonl"
PREVIEW_DIR = "previews"
SHARD_DTYPE = np.float32
"""Encodings are stored as float32: exactly what the encoder computed (float16 would halve
the size but round tanh outputs near +-1 to steps of 2**-11, about 5e-4)."""


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
    atomic_write_text(out_dir / MANIFEST_FILE, "".join(json.dumps(r) + "\n" for r in lines))
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
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


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
    atomic_write_bytes(out_dir / f"{_shard_name(k)}.npy", buffer.getvalue())
    atomic_write_text(out_dir / f"{_shard_name(k)}.jsonl", "".join(json.dumps(r) + "\n" for r in records))


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
        atomic_write_bytes(path, _png(encoding))
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


