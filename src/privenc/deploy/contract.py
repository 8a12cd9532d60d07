"""What a deployed encoder is: the weights, where they came from, and the input contract that
every runtime must follow to reproduce its encodings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

from privenc import __version__
from privenc import checkpoint as ckpt
from privenc.config import EncoderConfig, build_section
from privenc.errors import CheckpointError
from privenc.models import Encoder
from privenc.runs import CONFIG_FILE, ENCODER_FILE, read_config, read_encoder

CONTRACT_KEY = "privenc_contract"
"""safetensors metadata key holding the contract (metadata values must be strings)."""



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
        loaded = read_encoder(file, device)
    except (KeyError, TypeError, ValueError) as err:  # ValueError includes ConfigError
        raise CheckpointError(f"{file}: not a usable encoder file ({type(err).__name__}: {err})") from None
    encoder = loaded.module
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{file}: no config.toml beside it; the run's config gives the input contract "
            f"(data.load_size). Pass the run folder, or export to .safetensors and use that"
        )
    config = read_config(run_dir)
    if config.data.image_size != encoder.image_size or config.to_dict()["encoder"] != loaded.encoder_config:
        raise CheckpointError(
            f"{file} does not match {config_path}: encoder config {loaded.encoder_config} at "
            f"{encoder.image_size}px vs {config.to_dict()['encoder']} at {config.data.image_size}px"
        )
    return Deployable(encoder, config.data.load_size, file, file_sha256(file), loaded.encoder_config,
                      loaded.step or 0)


def load_safetensors(path: Path | str, device: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild an :class:`Encoder` (eval mode, strict) from an exported ``.safetensors`` file;
    returns it with the input contract stored in the file's metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"encoder file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None
    if CONTRACT_KEY not in metadata:
        raise CheckpointError(f"{path}: no {CONTRACT_KEY!r} metadata; not exported by privenc")
    try:
        contract = json.loads(metadata[CONTRACT_KEY])
        encoder_cfg = build_section("encoder", EncoderConfig, contract["encoder_config"])
        encoder = Encoder(encoder_cfg, int(contract["input"]["image_size"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable contract metadata ({type(err).__name__}: {err})") from None
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


def contract_path(exported: Path) -> Path:
    """Where the contract of an exported file lives: ``encoder.onnx`` -> ``encoder.onnx.json``."""
    return exported.with_name(exported.name + ".json")


