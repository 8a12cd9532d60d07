"""privenc: learn privacy-preserving image encoders by adversarial training (Pittaluga et al.,
WACV 2019) and verify them against attackers retrained on the fixed encoder.

The library's entry points, for scripts (README, "Python API")::

    import privenc
    config = privenc.load_config("demo", ["train.iters=200"])
    privenc.train(config, "runs/lf")
    records = privenc.verify("runs/lf", config, ["g1c0"], "ver/lf")
    encoder = privenc.load_encoder("runs/lf")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Where each public name lives. Loaded on first use: `import privenc` must not import torch,
# because the command line tunes OpenMP and malloc before torch is loaded (privenc.runtime).
_API = {
    "Config": "privenc.config",
    "load_config": "privenc.config",
    "train": "privenc.training",
    "verify": "privenc.verification",
    "erase": "privenc.leace",
    "load_encoder": "privenc.runs",
    "read_encoder": "privenc.runs",
    "build_report": "privenc.report",
    "encode": "privenc.deploy",
    "export": "privenc.deploy",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'privenc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
