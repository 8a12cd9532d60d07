"""The report's figures: Figure 1 (validation accuracy against attacker iterations, from the
learning curves in verify.json), Figure 3 (test images, their Naive Blur and the encodings,
histogram-equalized per location and channel by :func:`equalize`, which ``encode`` previews
use too) and a sweep's privacy–utility front (:func:`pareto_figure`, from sweep.json).
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


MARKERS = "osD^v<>ph"
REFERENCE_MARKERS = "*PXdH"  # none of MARKERS: a reference never looks like a configuration


def pareto_figure(sweep: dict[str, Any], path: Path) -> Path:
    """A sweep's privacy–utility plane (privenc/sweep.py defines the axes): each configuration
    at its mean over seeds with min-max error bars, one colour per method (train.encoder_loss),
    one marker per combination of the other varied values; the front through the means of the
    configurations on it; the audited worst case of a front configuration as a hollow marker
    joined to its plain one; each reference encoder black, with a marker of its own and its name."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    configurations = sweep["configurations"]
    methods = list(dict.fromkeys(c["method"] for c in configurations))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    others = [k for k in sweep["vary"] if k != "train.encoder_loss"]

    def rest(c: dict[str, Any]) -> str:
        return ", ".join(f"{k.partition('.')[2]}={c['values'][k]}" for k in others)

    markers = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(dict.fromkeys(map(rest, configurations)))}
    fig, ax = plt.subplots(figsize=(9.5, 5.5))
    for c in configurations:
        x, y = c["x"], c["y"]
        colour, marker = colours[c["method"]], markers[rest(c)]
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                    yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]], fmt=marker, color=colour,
                    markersize=7, capsize=3, elinewidth=0.8)
        audited = c.get("audit")
        if audited:
            ax.plot([x["mean"], audited["x"]], [y["mean"], y["mean"]], linestyle=":", color=colour, linewidth=1)
            ax.plot(audited["x"], y["mean"], marker=marker, markerfacecolor="none", color=colour, markersize=9)
    front = sorted((c for c in configurations if c["on_front"]), key=lambda c: c["x"]["mean"])
    ax.plot([c["x"]["mean"] for c in front], [c["y"]["mean"] for c in front], "--", color="black", linewidth=1,
            zorder=0)
    shapes = {r["name"]: REFERENCE_MARKERS[i % len(REFERENCE_MARKERS)] for i, r in enumerate(sweep["references"])}
    for r in sweep["references"]:
        ax.plot(r["x"], r["y"], marker=shapes[r["name"]], color="black", markersize=10, linestyle="none")
        ax.annotate(r["name"], (r["x"], r["y"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    handles = [Line2D([], [], color=colours[m], marker="o", linestyle="none", label=m) for m in methods]
    if others:
        handles += [Line2D([], [], color="grey", marker=markers[label], linestyle="none", label=label)
                    for label in markers]
    handles.append(Line2D([], [], color="black", linestyle="--", label="front (configuration means)"))
    if any(c.get("audit") for c in configurations):
        handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="none",
                              label="audited worst case"))
    handles += [Line2D([], [], color="black", marker=shape, linestyle="none", label=f"reference: {name}")
                for name, shape in shapes.items()]
    # Beside the axes: inside, "best" dodges the points but not the references' names.
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    private, desirable = sweep["tasks"]["private"], sweep["tasks"]["desirable"]
    ax.set_xlabel(f"private ({', '.join(private)}): test balanced accuracy − chance 1/K "
                  f"(points; lower is more private)")
    ax.set_ylabel(f"desirable ({', '.join(desirable)}): balanced accuracy − Identity's (points)", fontsize=9)
    ax.xaxis.label.set_fontsize(9)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.margins(x=0.1)  # room for the references' names, written right of their markers
    ax.set_title("\n".join(textwrap.wrap(sweep["command"], 90)), fontsize=8, family="monospace")
    seeds = ", ".join(map(str, sweep["seeds"]))
    caption = (f"Each configuration: mean over seeds {seeds} ({sweep['seed_key']}), error bars "
               f"{sweep['definitions']['spread']}; "
               f"x and y from the strongest verification attacker (chosen on validation, scored on test). "
               + (f"Hollow: {sweep['definitions']['audit']}." if sweep["definitions"].get("audit") else ""))
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, 130)), fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save_figure(fig, path)
    plt.close(fig)
    return path


def audit_figure(v: dict[str, Any], encoder: str, path: Path) -> Path:
    """One task's audit at a glance: left, each attack's attacker chosen on validation with its
    test balanced accuracy and bootstrap interval, against chance (1/K), plain verify and
    Identity; right, the best validation balanced accuracy over the rounds of the zoo search
    (flat at the end = converged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, rounds) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    ran = [a for a in v["attacks"] if "skipped" not in a]
    names = [a["attack"] for a in ran]
    values = np.array([100 * a["test_bacc_best"] for a in ran])
    lows = values - np.array([100 * a["test_bacc_ci95"][0] for a in ran])
    highs = np.array([100 * a["test_bacc_ci95"][1] for a in ran]) - values
    worst = v["worst_case"].get("attack") or "zoo"
    colours = ["tab:red" if name == worst else "tab:blue" for name in names]
    y = np.arange(len(ran))[::-1]
    bars.barh(y, values, xerr=[lows, highs], color=colours, alpha=0.8, capsize=3)
    bars.set_yticks(y, names)
    bars.axvline(100 * v["bacc_chance"], color="black", linestyle="--", linewidth=1, label="chance (1/K)")
    bars.axvline(100 * v["plain_verify_test_bacc"], color="tab:green", linestyle=":", linewidth=1.2,
                 label="plain verify")
    if v.get("identity_test_bacc") is not None:
        bars.axvline(100 * v["identity_test_bacc"], color="tab:purple", linestyle="-.", linewidth=1.2,
                     label="Identity")
    bars.set_xlim(0, 100)
    bars.set_xlabel("test balanced accuracy, % (attacker chosen on validation; 95% bootstrap interval)")
    skipped = [a["attack"] for a in v["attacks"] if "skipped" in a]
    bars.set_title(f"{encoder}, {v['task']} ({v['role']}): worst case in red"
                   + (f"; skipped: {', '.join(skipped)}" if skipped else ""), fontsize=9)
    bars.legend(fontsize=8, loc="lower right")
    ks = [r["round"] for r in v["rounds"]]
    rounds.plot(ks, [100 * r["best_val_bacc"] for r in v["rounds"]], marker="o", label="best so far")
    rounds.plot(ks, [100 * r["round_best_val_bacc"] for r in v["rounds"]], marker="x", linestyle=":",
                label="round's best")
    confirmed = [(r["round"], 100 * r["confirmed_bacc"]) for r in v["rounds"] if r.get("confirmed_bacc") is not None]
    if confirmed:  # without the lift of choosing among more attackers (privenc.audit.confirmed_score)
        rounds.plot(*zip(*confirmed), marker="s", linestyle="--", label="confirmed so far")
    rounds.set_xticks(ks)
    rounds.set_xlabel("round of the zoo search")
    rounds.set_ylabel("validation balanced accuracy, %")
    rounds.set_title("converged" if v["converged"] else "NOT converged", fontsize=9)
    rounds.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path
