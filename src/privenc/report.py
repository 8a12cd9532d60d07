"""Reports built from run folders alone: the paper's Table 1 and Table 2 shapes, Figure 1
(validation accuracy vs attacker iterations), Figure 3 (images, blurred images, encodings) and
the normalization ablation, as ``report.md``, ``report.json``, one CSV per table and PNGs.

Inputs are folders: training runs (``metrics.jsonl``, ``config.toml``, ``encoder.pt``) and
verification or grid outputs (``verify.json``, ``cells/*/verify.json``). Nothing is retrained,
so a report can be redrawn at any time.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from privenc.checkpoint import atomic_write_bytes, atomic_write_text, ensure_writable, refuse_run_folder
from privenc.config import load_config
from privenc.verify import strongest

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- reading folders


def read_folders(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training runs, verification records) found in the given folders (searched recursively,
    so a demo folder holding runs and a grid can be passed as one)."""
    runs, records, seen = [], [], set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        for metrics in sorted(root.rglob("metrics.jsonl")):
            run_dir = metrics.parent
            if run_dir not in seen:
                seen.add(run_dir)
                runs.append(_read_run(run_dir))
        for path in sorted(root.rglob("verify.json")):
            records.extend(json.loads(path.read_text()))
    return runs, records


def _read_run(run_dir: Path) -> dict[str, Any]:
    from privenc.train import read_metrics

    config = load_config(str(run_dir / "config.toml"))
    metrics = read_metrics(run_dir / "metrics.jsonl")
    last = metrics[-1] if metrics else {}
    # Within-training accuracy: mean of the last quarter of the logged validation accuracies,
    # which smooths the oscillation of the two-player game.
    tail = metrics[-max(1, len(metrics) // 4):]
    def tail_mean(key: str) -> float | None:
        values = [m[key] for m in tail if key in m]
        return float(np.mean(values)) if values else None
    # one per private task, in config order (training logs val_private{k}_acc)
    private_accs = {task: tail_mean(f"val_private{k}_acc") for k, task in enumerate(config.train.private)}
    return {
        "name": run_dir.name, "path": str(run_dir), "config": config,
        "private": config.train.private, "desirable": config.train.desirable,
        "encoder_loss": config.train.encoder_loss, "norm": config.encoder.norm,
        "steps": last.get("step"),
        "within_val_private_acc": next(iter(private_accs.values()), None),  # the first private task's
        "within_val_private_accs": private_accs,
        "within_val_desirable_acc": tail_mean("val_desirable_acc"),
        "collapse_zero_var_frac": last.get("collapse_zero_var_frac"),
        "collapse_low_var_frac": last.get("collapse_low_var_frac"),
        "metrics": metrics,
    }


def encoder_label(run: dict[str, Any]) -> str:
    """The paper's row names: '-Army Base +Airport T.' = inhibits army_base, keeps airport_terminal."""
    return " ".join([*(f"-{t}" for t in run["private"]), *(f"+{t}" for t in run["desirable"])])


# --------------------------------------------------------------------------- tables


def wilson_halfwidth(accuracy: float, n: int, z: float = 1.96) -> float:
    """Half-width of the 95% Wilson score interval of an accuracy measured on n test images
    (the spread from the test set's size alone; attacker seeds add their own)."""
    if n <= 0:
        return float("nan")
    centre_shift = z * z / (2 * n)
    root = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    low = (accuracy + centre_shift - root) / (1 + z * z / n)
    high = (accuracy + centre_shift + root) / (1 + z * z / n)
    return (high - low) / 2


def _pm(halfwidth: float | None) -> str:
    return "" if halfwidth is None else f" ± {100 * halfwidth:.1f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _several_private(runs: list[dict[str, Any]]) -> bool:
    """Whether some run inhibits more than one task: the tables then name the private task."""
    return any(len(run["private"]) > 1 for run in runs)


def table1(runs: list[dict[str, Any]], records: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Private-task accuracy within adversarial training vs after verification (val, test):
    one row per run and private task."""
    best = strongest(records)
    rows = []
    for run in runs:
        for task in run["private"]:
            verified = best.get((run["name"], task)) or {}
            ci95 = wilson_halfwidth(verified["test_acc_best"], verified["n_test"]) if verified else None
            rows.append({
                "run": run["name"], "encoder": encoder_label(run), "encoder_loss": run["encoder_loss"], "task": task,
                "within_training_val": run["within_val_private_accs"][task],
                "verified_val": verified.get("val_acc_best"),
                "verified_test": verified.get("test_acc_best"),
                "verified_test_ci95": ci95,
                "verified_saturated": verified.get("saturated"),
            })
    # A private-task column only where some run has several (one private task: the paper's shape).
    named = _several_private(runs)
    task_head, task_rule = (" private task |", "---|") if named else ("", "")
    lines = [f"| run | encoder | encoder loss |{task_head} within training, val | verification, val "
             "| verification, test (95% CI) |",
             f"|---|---|---|{task_rule}---|---|---|"]
    for r in rows:
        note = "" if r["verified_saturated"] in (None, True) else " (not saturated)"
        task_cell = f" {r['task']} |" if named else ""
        lines.append(f"| {r['run']} | {r['encoder']} | {r['encoder_loss']} |{task_cell} "
                     f"{_pct(r['within_training_val'])} | {_pct(r['verified_val'])} "
                     f"| {_pct(r['verified_test'])}{_pm(r['verified_test_ci95'])}{note} |")
    return "\n".join(lines), rows


def table2(runs: list[dict[str, Any]], records: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Encoders x tasks: test accuracy of the strongest attacker (selected on validation).
    Cells of an encoder's private tasks are marked '−', of its desirable tasks '+'."""
    best = strongest(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    encoders = list(dict.fromkeys(r["encoder"] for r in records))
    order = {"identity": 0, "blur": 1}
    encoders.sort(key=lambda e: order.get(e, 2))
    labels = {run["name"]: encoder_label(run) for run in runs}
    rows = []
    lines = ["| encoder | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for enc in encoders:
        cells, row = [], {"encoder": enc, "label": labels.get(enc, enc), "cells": {}}
        for task in tasks:
            r = best.get((enc, task))
            if r is None:
                cells.append("—")
                continue
            mark = {"private": "−", "desirable": "+"}.get(r["role"], "")
            star = "" if r["saturated"] else "*"
            ci = wilson_halfwidth(r["test_acc_best"], r["n_test"])
            cells.append(f"{mark}{r['test_acc_best']:.3f}{star} ±{ci:.2f}")
            row["cells"][task] = {"test_acc": r["test_acc_best"], "ci95": ci, "n_test": r["n_test"],
                                  "role": r["role"], "saturated": r["saturated"],
                                  "chance": r["chance"], "info_bits": r["info_bits"]}
        # A run's label says what it hides and keeps; a verify folder given without its run has none.
        name = f"{enc} ({labels[enc]})" if enc in labels and enc not in order else enc
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        rows.append(row)
    lines.append("")
    lines.append("− = a private task of that encoder, + = a desirable task; * = attacker not saturated.")
    return "\n".join(lines), rows


def ablation_table(runs: list[dict[str, Any]], records: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Normalization variants: collapse diagnostics (Sec. 4.2) and verified accuracies, one row
    per run (the diagnostics belong to the encoder) and, where some run has several private
    tasks, one private-accuracy column per private task."""
    best = strongest(records)

    def test_acc(run: dict[str, Any], task: str) -> float | None:
        record = best.get((run["name"], task))
        return record["test_acc_best"] if record else None

    # One private task per run keeps the single column, whichever task each run hides.
    columns = list(dict.fromkeys(t for run in runs for t in run["private"])) if _several_private(runs) else []
    private_head = "".join(f" private test acc, {t} |" for t in columns) or " private test acc |"
    lines = [f"| run | normalization | output var ~0 | output var < 0.5 |{private_head} desirable test acc |",
             "|---" * (5 + max(1, len(columns))) + "|"]
    rows = []
    for run in runs:
        private_tests = {task: test_acc(run, task) for task in run["private"]}
        row = {"run": run["name"], "norm": run["norm"], "zero_var": run["collapse_zero_var_frac"],
               "low_var": run["collapse_low_var_frac"],
               "private_test": private_tests[run["private"][0]],  # the first private task
               "private_tests": private_tests,
               "desirable_test": test_acc(run, run["desirable"][0]) if run["desirable"] else None}
        rows.append(row)
        # "—" also in the column of a task that another run hides and this one does not
        private_cells = [_pct(private_tests.get(t)) for t in columns] or [_pct(row["private_test"])]
        lines.append(f"| {run['name']} | {run['norm']} | {_pct(row['zero_var'])} | {_pct(row['low_var'])} | "
                     + " | ".join(private_cells) + f" | {_pct(row['desirable_test'])} |")
    return "\n".join(lines), rows


# --------------------------------------------------------------------------- CSV


TABLE1_COLUMNS = ["run", "encoder", "encoder_loss", "task", "within_training_val", "verified_val", "verified_test",
                  "verified_test_ci95", "verified_saturated"]
TABLE2_COLUMNS = ["encoder", "label", "task", "role", "test_acc", "ci95", "n_test", "saturated", "chance",
                  "info_bits"]
ABLATION_COLUMNS = ["run", "norm", "zero_var", "low_var", "private_task", "private_test", "desirable_test"]


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A header row, then one line per row: numbers as report.json holds them (accuracies as
    fractions, full precision), an empty field for a missing value, true/false for flags."""
    def field(value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return value

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[field(row.get(c)) for c in columns] for row in rows])
    return buffer.getvalue()


def table2_long(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 2's cells as one flat row per encoder and task (a pivot gives the table back)."""
    return [{"encoder": row["encoder"], "label": row["label"], "task": task, **cell}
            for row in rows for task, cell in row["cells"].items()]


def ablation_long(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation as one flat row per run and private task (the diagnostics repeat)."""
    return [{**row, "private_task": task, "private_test": acc}
            for row in rows for task, acc in row["private_tests"].items()]


# --------------------------------------------------------------------------- figures


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
        ax.plot(curve[:, 0], curve[:, 1], label=f"{enc} ({r['attacker']})")
        if r.get("lr_dropped_at"):
            ax.axvline(r["lr_dropped_at"], color=ax.lines[-1].get_color(), linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    # plain numbers at 1, 2 and 5 per decade (the default minor labels, 3x10^2 4x10^2, collide)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("attacker iterations (log scale; dotted: the 10x LR drop)")
    ax.set_ylabel(f"validation accuracy ({task})")
    chances = {r["chance"] for (_, t), r in strongest(records).items() if t == task}
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
    from privenc.train import load_encoder

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
            label = f"{run['name']}\n{encoder_label(run)}\n({run['encoder_loss']}, {run['norm']})"
            rows.append((label, encoder(images)))
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


# --------------------------------------------------------------------------- the report


def build_report(inputs: list[Path], out_dir: Path, figures: bool = True) -> dict[str, Any]:
    out_dir = Path(out_dir)
    refuse_run_folder(out_dir, "report")
    created = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # deepest first
    ensure_writable(out_dir)
    try:
        runs, records = read_folders(inputs)
        if not runs and not records:
            raise FileNotFoundError(f"no training runs (metrics.jsonl) or verification results (verify.json) "
                                    f"under {', '.join(map(str, inputs))}")
    except BaseException:
        for folder in created:  # a typo in the inputs leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    t1, t1_rows = table1(runs, records)
    t2, t2_rows = table2(runs, records)
    ab, ab_rows = ablation_table(runs, records)
    sections = ["# privenc report", "", f"Built from: {', '.join(str(p) for p in inputs)}", ""]
    if runs:
        sections += ["## Table 1 — private-task accuracy within adversarial training vs after verification", "",
                     "Within training: the adversarially trained private classifier on validation images, balanced "
                     "accuracy (mean per-class recall; chance 1/K), mean of the last quarter of logged evaluations. "
                     "Verification: the strongest fresh attacker "
                     "(selected by validation accuracy) on the fixed encoder.", "", t1, ""]
    if records:
        sections += ["## Table 2 — test accuracy under the verification protocol", "",
                     "Strongest attacker (selected on validation), test accuracy ± the half-width of its 95% "
                     "Wilson interval from the number of test images.",
                     "", t2, ""]
    if runs:
        sections += ["## Normalization ablation — collapse diagnostics", "",
                     "Fraction of pre-tanh output elements whose variance over validation images is ~0 "
                     "(< 1e-4) and < 0.5; the variance constraint asks for 1.", "", ab, ""]
    # One CSV per table shown, in the long form that report.json's rows have.
    tables = {}
    if runs:
        tables["report_table1.csv"] = csv_text(TABLE1_COLUMNS, t1_rows)
        tables["report_ablation.csv"] = csv_text(ABLATION_COLUMNS, ablation_long(ab_rows))
    if records:
        tables["report_table2.csv"] = csv_text(TABLE2_COLUMNS, table2_long(t2_rows))
    sections += ["Tables as CSV (one row per run and private task, or per encoder and task; accuracies as "
                 "fractions): " + ", ".join(f"[{name}]({name})" for name in sorted(tables)), ""]
    pictures = []
    if figures and records:
        private_tasks = list(dict.fromkeys(t for run in runs for t in run["private"])) or \
            list(dict.fromkeys(r["task"] for r in records))[:1]
        for task in private_tasks:
            name = f"figure1_{task.replace('/', '-')}.png"
            figure1(records, task, out_dir / name)
            pictures.append(name)
            sections += [f"## Figure 1 — validation accuracy of attackers vs iterations ({task})", "",
                         f"![figure 1]({name})", ""]
    if figures and runs:
        if figure3(runs, out_dir / "figure3.png"):
            pictures.append("figure3.png")
            sections += ["## Figure 3 — images, naive blur, and encodings (equalized per location and channel)",
                         "", "![figure 3](figure3.png)", ""]
    report = {"table1": t1_rows, "table2": t2_rows, "ablation": ab_rows, "figures": pictures, "csv": sorted(tables),
              "runs": [{k: v for k, v in run.items() if k not in ("config", "metrics")} for run in runs],
              "records": records}
    for name in ("report_table1.csv", "report_table2.csv", "report_ablation.csv"):
        # a table left by an earlier report into this folder would contradict this one
        if name in tables:
            atomic_write_text(out_dir / name, tables[name])
        else:
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(out_dir / "report.md", "\n".join(sections))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    return report
