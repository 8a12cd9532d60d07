"""Reports built from run folders alone: the paper's Table 1 and Table 2 shapes, Figure 1
(validation accuracy vs attacker iterations), Figure 3 (images, blurred images, encodings), the
normalization ablation and a sweep's privacy–utility front, as ``report.md``, ``report.json``,
one CSV per table and PNGs.

Inputs are folders: training runs (``metrics.jsonl``, ``config.toml``, ``encoder.pt``),
verification or grid outputs (``verify.json``, ``cells/*/verify.json``) and sweeps
(``sweep.json``, which holds runs and a grid too). Nothing is retrained, so a report can be
redrawn at any time.
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

from privenc.atomic import atomic_write_text, ensure_writable
from privenc.figures import figure1, figure3, pareto_figure
from privenc.runs import METRICS_FILE, read_config, read_metrics, refuse_run_folder, role_label
from privenc.verification import strongest

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
        for metrics in sorted(root.rglob(METRICS_FILE)):
            run_dir = metrics.parent
            if run_dir not in seen:
                seen.add(run_dir)
                runs.append(_read_run(run_dir))
        for path in sorted(root.rglob("verify.json")):
            records.extend(json.loads(path.read_text()))
    return runs, records


def read_sweeps(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, sweep.json's content) of every sweep in the given folders (searched recursively)."""
    return [(path.parent, json.loads(path.read_text()))
            for root in paths for path in sorted(Path(root).rglob("sweep.json"))]


def _read_run(run_dir: Path) -> dict[str, Any]:
    config = read_config(run_dir)
    metrics = read_metrics(run_dir)
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
    return role_label(run["private"], run["desirable"])


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


def _interval(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f" [{100 * lo:.1f}, {100 * hi:.1f}]"


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
            lo, hi = verified.get("test_bacc_ci95") or (None, None)
            rows.append({
                "run": run["name"], "encoder": encoder_label(run), "encoder_loss": run["encoder_loss"], "task": task,
                "within_training_val": run["within_val_private_accs"][task],
                "verified_val": verified.get("val_acc_best"),
                "verified_test": verified.get("test_acc_best"),
                "verified_test_ci95": ci95,
                "verified_saturated": verified.get("saturated"),
                # balanced accuracy beside (absent from verify.json written before it was recorded)
                "verified_val_bacc": verified.get("val_bacc_best"),
                "verified_test_bacc": verified.get("test_bacc_best"),
                "verified_test_bacc_lo": lo, "verified_test_bacc_hi": hi,
                "majority_rate": verified.get("chance"),
            })
    # A private-task column only where some run has several (one private task: the paper's shape).
    named = _several_private(runs)
    task_head, task_rule = (" private task |", "---|") if named else ("", "")
    lines = [f"| run | encoder | encoder loss |{task_head} within training, val | verification, val "
             "| verification, test (95% CI) | verification, val balanced | verification, test balanced (95% CI) "
             "| majority rate |",
             f"|---|---|---|{task_rule}---|---|---|---|---|---|"]
    for r in rows:
        note = "" if r["verified_saturated"] in (None, True) else " (not saturated)"
        task_cell = f" {r['task']} |" if named else ""
        lines.append(f"| {r['run']} | {r['encoder']} | {r['encoder_loss']} |{task_cell} "
                     f"{_pct(r['within_training_val'])} | {_pct(r['verified_val'])} "
                     f"| {_pct(r['verified_test'])}{_pm(r['verified_test_ci95'])}{note} "
                     f"| {_pct(r['verified_val_bacc'])} | {_pct(r['verified_test_bacc'])}"
                     f"{_interval(r['verified_test_bacc_lo'], r['verified_test_bacc_hi'])} "
                     f"| {_pct(r['majority_rate'])} |")
    return "\n".join(lines), rows


def table2(runs: list[dict[str, Any]], records: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Encoders x tasks: test accuracy of the strongest attacker (selected on validation).
    Cells of an encoder's private tasks are marked '−', of its desirable tasks '+'."""
    best = strongest(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    encoders = list(dict.fromkeys(r["encoder"] for r in records))
    # The references first: the paper's baselines, then closed-form LEACE erasers, then learned encoders.
    kinds = {r["encoder"]: r.get("encoder_kind") for r in records}
    order = {"identity": 0, "blur": 1, "leace": 2}
    encoders.sort(key=lambda e: order.get(kinds[e] or e, 3))
    labels = {run["name"]: encoder_label(run) for run in runs}
    for r in records:  # an encoder without a training run names itself (a LEACE eraser: what it erases)
        if r.get("encoder_label"):
            labels.setdefault(r["encoder"], r["encoder_label"])
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
            lo, hi = r.get("test_bacc_ci95") or (None, None)
            balanced = "" if lo is None else f"; bal. {r['test_bacc_best']:.3f} [{lo:.3f}, {hi:.3f}]"
            cells.append(f"{mark}{r['test_acc_best']:.3f}{star} ±{ci:.2f}{balanced}")
            row["cells"][task] = {"test_acc": r["test_acc_best"], "ci95": ci, "n_test": r["n_test"],
                                  "role": r["role"], "saturated": r["saturated"],
                                  "chance": r["chance"], "info_bits": r["info_bits"],
                                  "test_bacc": r.get("test_bacc_best"), "test_bacc_lo": lo, "test_bacc_hi": hi,
                                  "bacc_chance": r.get("bacc_chance")}
        # A run's label says what it hides and keeps; a verify folder given without its run has none.
        name = f"{enc} ({labels[enc]})" if enc in labels and enc not in ("identity", "blur") else enc
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        rows.append(row)
    lines.append("")
    lines.append("− = a private task of that encoder, + = a desirable task; * = attacker not saturated; "
                 "bal. = balanced accuracy [bootstrap 95% interval].")
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
    # On unseen images: verification's test encodings of the run's first private task (verify.json
    # records of this version on); "—" for older records.
    lines = [f"| run | normalization | output var ~0 | output var < 0.5 | test var ~0 | test var < 0.5 |{private_head} "
             "desirable test acc |",
             "|---" * (7 + max(1, len(columns))) + "|"]
    rows = []
    for run in runs:
        private_tests = {task: test_acc(run, task) for task in run["private"]}
        row = {"run": run["name"], "norm": run["norm"], "zero_var": run["collapse_zero_var_frac"],
               "low_var": run["collapse_low_var_frac"],
               "private_test": private_tests[run["private"][0]],  # the first private task
               "private_tests": private_tests,
               "desirable_test": test_acc(run, run["desirable"][0]) if run["desirable"] else None}
        unseen = best.get((run["name"], run["private"][0])) or {}
        row["test_zero_var"] = unseen.get("test_collapse_zero_var_frac")
        row["test_low_var"] = unseen.get("test_collapse_low_var_frac")
        rows.append(row)
        # "—" also in the column of a task that another run hides and this one does not
        private_cells = [_pct(private_tests.get(t)) for t in columns] or [_pct(row["private_test"])]
        lines.append(f"| {run['name']} | {run['norm']} | {_pct(row['zero_var'])} | {_pct(row['low_var'])} | "
                     f"{_pct(row['test_zero_var'])} | {_pct(row['test_low_var'])} | "
                     + " | ".join(private_cells) + f" | {_pct(row['desirable_test'])} |")
    return "\n".join(lines), rows


# --------------------------------------------------------------------------- CSV


# Balanced-accuracy columns come last, so that readers of the earlier columns keep working.
TABLE1_COLUMNS = ["run", "encoder", "encoder_loss", "task", "within_training_val", "verified_val", "verified_test",
                  "verified_test_ci95", "verified_saturated", "verified_val_bacc", "verified_test_bacc",
                  "verified_test_bacc_lo", "verified_test_bacc_hi", "majority_rate"]
TABLE2_COLUMNS = ["encoder", "label", "task", "role", "test_acc", "ci95", "n_test", "saturated", "chance",
                  "info_bits", "test_bacc", "test_bacc_lo", "test_bacc_hi", "bacc_chance"]
ABLATION_COLUMNS = ["run", "norm", "zero_var", "low_var", "private_task", "private_test", "desirable_test",
                    "test_zero_var", "test_low_var"]


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
    sweeps = read_sweeps(inputs)
    pictures = []
    from privenc.sweep import sweep_markdown  # here: the sweep module brings training and the audit

    for i, (folder, sweep) in enumerate(sweeps):
        name = "pareto.png" if len(sweeps) == 1 else f"pareto_{i + 1}.png"
        table = sweep_markdown(sweep).split("\n", 2)[2]  # without its own title
        sections += [f"## Sweep — the privacy–utility front ({folder})", "", table, ""]
        if figures:
            pareto_figure(sweep, out_dir / name)  # redrawn from sweep.json: nothing is retrained
            pictures.append(name)
            sections += [f"![privacy–utility front]({name})", ""]
    if runs:
        sections += ["## Table 1 — private-task accuracy within adversarial training vs after verification", "",
                     "Within training: the adversarially trained private classifier on validation images, balanced "
                     "accuracy (mean per-class recall; chance 1/K), mean of the last quarter of logged evaluations. "
                     "Verification: the strongest fresh attacker "
                     "(selected by validation balanced accuracy) on the fixed encoder: accuracy with the 95% Wilson "
                     "interval, and balanced accuracy with a bootstrap 95% interval over the test images; the "
                     "majority rate is accuracy's chance level, 1/K balanced accuracy's.", "", t1, ""]
    if records:
        sections += ["## Table 2 — test accuracy under the verification protocol", "",
                     "Strongest attacker (selected on validation balanced accuracy), test accuracy ± the half-width "
                     "of its 95% Wilson interval from the number of test images; then its balanced accuracy (mean "
                     "per-class recall, chance 1/K) with a bootstrap 95% interval over the test images.",
                     "", t2, ""]
    if runs:
        sections += ["## Normalization ablation — collapse diagnostics", "",
                     "Fraction of pre-tanh output elements whose variance over images is ~0 (< 1e-4) and < 0.5; "
                     "the variance constraint asks for 1. \"output var\": the validation batches of training's "
                     "last log; \"test var\": the test images of the run's first private task, as verification "
                     "encodes them (images the encoder never trained on).", "", ab, ""]
    # One CSV per table shown, in the long form that report.json's rows have.
    tables = {}
    if runs:
        tables["report_table1.csv"] = csv_text(TABLE1_COLUMNS, t1_rows)
        tables["report_ablation.csv"] = csv_text(ABLATION_COLUMNS, ablation_long(ab_rows))
    if records:
        tables["report_table2.csv"] = csv_text(TABLE2_COLUMNS, table2_long(t2_rows))
    sections += ["Tables as CSV (one row per run and private task, or per encoder and task; accuracies as "
                 "fractions): " + ", ".join(f"[{name}]({name})" for name in sorted(tables)), ""]
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
              "sweeps": [{"folder": str(folder), "front": sweep["front"]} for folder, sweep in sweeps],
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
