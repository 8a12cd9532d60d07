"""The report's figures: Figure 1 (validation accuracy against attacker iterations, from the
learning curves in verify.json) and Figure 3 (test images, their Naive Blur and the encodings,
histogram-equalized per location and channel by :func:`equalize`, which ``encode`` previews
use too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privenc.atomic import atomic_write_bytes
from privenc.runs import load_encoder, role_label
from privenc.verification import strongest

log = logging.getLogger(__name__)


def figure1(records: list[dict[str, Any]], task: str, path: Path) -> Path:
    """Validation accuracy vs attacker iterations (log x), one curve per encoder: the
    strongest attacker's curve for ``task`` (the paper's Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for (enc, t), r in strongest(records).items():
        if t != task or not r["curve"]:
            continue
        curve = np.asarray(r["curve"])
        # balanced accuracy (4th column) where recorded: the measure the attacker was chosen by
        ax.plot(curve[:, 0], curve[:, 3 if curve.shape[1] > 3 else 1], label=f"{enc} ({r['attacker']})")
        if r.get("lr_dropped_at"):
            ax.axvline(r["lr_dropped_at"], color=ax.lines[-1].get_color(), linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    # plain numbers at 1, 2 and 5 per decade (the default minor labels, 3x10^2 4x10^2, collide)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("attacker iterations (log scale; dotted: the 10x LR drop)")
    ax.set_ylabel(f"validation accuracy, balanced where recorded ({task})")
    chances = {r.get("bacc_chance", r["chance"]) for (_, t), r in strongest(records).items() if t == task}
    ax.axhline(chances.pop() if len(chances) == 1 else 0.5, color="grey", linewidth=0.5)
    ax.set_title(f"Verification: attackers trained on fixed encoders — {task}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _save_figure(fig, path: Path) -> None:
    """A PNG written atomically, like every other result file (a crash leaves the old one)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def equalize(encodings: np.ndarray) -> np.ndarray:
    """Histogram equalization per location and channel over a set of encodings (N, C, H, W):
    each value becomes its rank among the N images at that (c, y, x), scaled to [0, 1]. Shows
    what varies at each location regardless of the output's scale."""
    ranks = encodings.argsort(axis=0).argsort(axis=0).astype(np.float32)
    return ranks / max(1, encodings.shape[0] - 1)


def figure3(runs: list[dict[str, Any]], path: Path, count: int = 8, reference: int = 256) -> Path | None:
    """Rows of original images, blurred images and each run's encodings (equalized), on the
    first test images of the first run's private task (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from privenc.data import prepare
    from privenc.models import build_encoder

    if not runs:
        return None
    first = runs[0]["config"]
    data = prepare(first.data, first.train.private[:1], run_dir=Path(runs[0]["path"]))
    dataset = data.dataset("test", augment=False)
    n = min(reference, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(n)])
    rows = [("original", images)]
    blur = build_encoder("blur", first.encoder, first.data.image_size)
    rows.append(("naive blur", blur(images)))
    for run in runs:
        encoder = load_encoder(Path(run["path"]))
        with torch.no_grad():
            roles = role_label(run["private"], run["desirable"])
            title = f"{run['name']}\n{roles}\n({run['encoder_loss']}, {run['norm']})"
            rows.append((title, encoder(images)))
    count = min(count, n)
    fig, axes = plt.subplots(len(rows), count, figsize=(1.3 * count, 1.4 * len(rows)), squeeze=False)
    for row, (title, tensor) in enumerate(rows):
        array = tensor.numpy()
        shown = equalize(array) if row >= 2 else (array + 1) / 2
        for col in range(count):
            ax = axes[row, col]
            picture = np.clip(shown[col, :3].transpose(1, 2, 0), 0, 1)
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(title, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path
