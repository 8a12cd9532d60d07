"""Checkpoints: one dict with a format version, written atomically, loaded safely.

A checkpoint holds everything needed to resume exactly (models, optimizers, step, RNG states,
data order) and nothing that needs pickle: it is read with ``torch.load(weights_only=True)``,
so a file carrying a pickled object is refused, never executed.
"""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privenc.atomic import atomic_write_bytes
from privenc.errors import CheckpointError

FORMAT_VERSION = 1


def save(path: Path, payload: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (``format_version`` is added)."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure becomes a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain data "
            f"(a pickled payload is never executed): {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {err}") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path}: not a privenc checkpoint (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload['format_version']} is not supported (expected {FORMAT_VERSION})"
        )
    return payload


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict state-dict loading with an error that lists what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched[:5]]
            parts.append("shape mismatches " + "; ".join(shapes))
        raise CheckpointError(f"{what} does not match this architecture: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop touches, as tensors and plain data (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _python_state_to_plain(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_plain(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_plain(plain: dict[str, Any]) -> tuple:
    return plain["version"], tuple(int(x) for x in plain["internal"].tolist()), plain["gauss"]
