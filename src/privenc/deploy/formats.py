"""``privenc export``: a standalone ONNX, TorchScript or safetensors encoder, checked against
the PyTorch encoder before it is written, with its input contract in a JSON file beside it."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.utils.data

from privenc import checkpoint as ckpt
from privenc.atomic import atomic_write_bytes, atomic_write_text
from privenc.config import EncoderConfig, build_section
from privenc.deploy.contract import CONTRACT_KEY, Deployable, contract_path, input_contract, open_encoder
from privenc.errors import ConfigError, ExportError
from privenc.models import Encoder

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "safetensors")
EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
ONNX_OPSET = 17
EXPORT_TOLERANCE = 1e-4
"""Largest absolute difference allowed between an export and the PyTorch encoder."""

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
                          f"(no {contract_path(out).name} "
                          f"contract beside it); choose another --out or remove it")
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
    atomic_write_text(contract_path(out), json.dumps(contract, indent=2) + "\n")
    atomic_write_bytes(out, data)
    log.info("exported %s to %s (contract %s)", model.path, out, contract_path(out))
    return out


def _is_export(path: Path, fmt: str) -> bool:
    """Whether ``path`` is a file written by :func:`export` in ``fmt`` (which a new export may replace)."""
    try:
        contract = json.loads(contract_path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return path.is_file() and isinstance(contract, dict) and contract.get("format") == fmt


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


