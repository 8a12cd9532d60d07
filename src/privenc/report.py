"""Reports built from run folders alone: the paper's Table 1 and Table 2 shapes, Figure 1
(validation accuracy vs attacker iterations), Figure 3 (images, blurred images, encodings), the
normalization ablation and a sweep's privacy–utility front, as ``report.md``, ``report.json``,
one CSV per table and PNGs.

Runs that differ only in ``train.seed`` are one configuration (:mod:`privenc.seeds`): where
some configuration has several seeds, the tables show each configuration's mean ± sd over its
seeds and a per-seed table lists every seed's number; with one seed each they are as before.
An audit folder among the inputs (audit.json) puts its worst case in the audited private
task's cells, marked †, plain verification's number kept beside it.

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
from privenc.seeds import group_runs, is_audit_folder, read_audits, seed_number, spread
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
            # an audit's Identity reference (OUT/identity) is not a cell of the tables; the folders
            # from the file's up to the root given are looked at
            if not any(is_audit_folder(folder) for folder in path.parents[:len(path.relative_to(root).parts)]):
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


AUDIT_NOTE = ("† the worst case of `privenc audit` (chosen on validation over the attacker zoo and the extra "
              "attacks) in place of plain verification's strongest attacker, whose number follows in parentheses "
              "where shown; report.json and the CSVs keep both.")


def _audit_fields(audit: dict[str, Any] | None) -> dict[str, Any]:
    """The audit's worst case beside a row's plain-verification numbers (None: not audited)."""
    audit = audit or {}
    return {"audit_test_bacc": audit.get("test_bacc"), "audit_test_bacc_lo": audit.get("test_bacc_lo"),
            "audit_test_bacc_hi": audit.get("test_bacc_hi"), "audit_test_acc": audit.get("test_acc"),
            "audit_attack": audit.get("attack"), "audit_converged": audit.get("converged")}


def table1(runs: list[dict[str, Any]], records: list[dict[str, Any]],
           audits: dict[tuple[str, str], dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Private-task accuracy within adversarial training vs after verification (val, test):
    one row per run and private task. ``audits`` (:func:`privenc.seeds.read_audits`): an
    audited task's test balanced accuracy is the audit's worst case, marked †."""
    best = strongest(records)
    audits = audits or {}
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
                **_audit_fields(audits.get((run["name"], task))),
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
        balanced = f"{_pct(r['verified_test_bacc'])}{_interval(r['verified_test_bacc_lo'], r['verified_test_bacc_hi'])}"
        if r["audit_test_bacc"] is not None:
            balanced = (f"{_pct(r['audit_test_bacc'])}{_interval(r['audit_test_bacc_lo'], r['audit_test_bacc_hi'])}† "
                        f"(verify {balanced})")
        lines.append(f"| {r['run']} | {r['encoder']} | {r['encoder_loss']} |{task_cell} "
                     f"{_pct(r['within_training_val'])} | {_pct(r['verified_val'])} "
                     f"| {_pct(r['verified_test'])}{_pm(r['verified_test_ci95'])}{note} "
                     f"| {_pct(r['verified_val_bacc'])} | {balanced} "
                     f"| {_pct(r['majority_rate'])} |")
    if any(r["audit_test_bacc"] is not None for r in rows):
        lines += ["", AUDIT_NOTE]
    return "\n".join(lines), rows


def _table2_encoders(runs: list[dict[str, Any]], records: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """Table 2's encoders in row order (the references first: the paper's baselines, then
    closed-form LEACE erasers, then learned encoders) and how each is labelled."""
    encoders = list(dict.fromkeys(r["encoder"] for r in records))
    kinds = {r["encoder"]: r.get("encoder_kind") for r in records}
    order = {"identity": 0, "blur": 1, "leace": 2}
    encoders.sort(key=lambda e: order.get(kinds[e] or e, 3))
    labels = {run["name"]: encoder_label(run) for run in runs}
    for r in records:  # an encoder without a training run names itself (a LEACE eraser: what it erases)
        if r.get("encoder_label"):
            labels.setdefault(r["encoder"], r["encoder_label"])
    return encoders, labels


def table2(runs: list[dict[str, Any]], records: list[dict[str, Any]],
           audits: dict[tuple[str, str], dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Encoders x tasks: test accuracy of the strongest attacker (selected on validation).
    Cells of an encoder's private tasks are marked '−', of its desirable tasks '+'; an audited
    private task's cell shows the audit's worst case, marked †."""
    best = strongest(records)
    audits = audits or {}
    tasks = list(dict.fromkeys(r["task"] for r in records))
    encoders, labels = _table2_encoders(runs, records)
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
            ci = wilson_halfwidth(r["test_acc_best"], r["n_test"])
            lo, hi = r.get("test_bacc_ci95") or (None, None)
            audit = audits.get((enc, task)) if r["role"] == "private" else None
            shown = r if audit is None else {  # the worst case, on the same test images
                "test_acc_best": audit["test_acc"], "saturated": audit["saturated"], "n_test": audit["n_test"],
                "test_bacc_best": audit["test_bacc"], "test_bacc_ci95": [audit["test_bacc_lo"], audit["test_bacc_hi"]]}
            star = "*" if shown["saturated"] is False else ""  # an extra attack's record may not say
            shown_lo, shown_hi = shown.get("test_bacc_ci95") or (None, None)
            balanced = ("" if shown_lo is None
                        else f"; bal. {shown['test_bacc_best']:.3f} [{shown_lo:.3f}, {shown_hi:.3f}]")
            cells.append(f"{mark}{shown['test_acc_best']:.3f}{star}{'' if audit is None else '†'} "
                         f"±{wilson_halfwidth(shown['test_acc_best'], shown['n_test']):.2f}{balanced}")
            row["cells"][task] = {"test_acc": r["test_acc_best"], "ci95": ci, "n_test": r["n_test"],
                                  "role": r["role"], "saturated": r["saturated"],
                                  "chance": r["chance"], "info_bits": r["info_bits"],
                                  "test_bacc": r.get("test_bacc_best"), "test_bacc_lo": lo, "test_bacc_hi": hi,
                                  "bacc_chance": r.get("bacc_chance"), **_audit_fields(audit)}
        # A run's label says what it hides and keeps; a verify folder given without its run has none.
        name = f"{enc} ({labels[enc]})" if enc in labels and enc not in ("identity", "blur") else enc
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        rows.append(row)
    lines.append("")
    lines.append("− = a private task of that encoder, + = a desirable task; * = attacker not saturated; "
                 "bal. = balanced accuracy [bootstrap 95% interval].")
    if any(cell["audit_test_bacc"] is not None for row in rows for cell in row["cells"].values()):
        lines += ["", AUDIT_NOTE]
    return "\n".join(lines), rows


def ablation_table(runs: list[dict[str, Any]], records: list[dict[str, Any]],
                   audits: dict[tuple[str, str], dict[str, Any]] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Normalization variants: collapse diagnostics (Sec. 4.2) and verified accuracies, one row
    per run (the diagnostics belong to the encoder) and, where some run has several private
    tasks, one private-accuracy column per private task (an audited one: the accuracy of the
    audit's worst case, marked †)."""
    best = strongest(records)
    audits = audits or {}

    def test_acc(run: dict[str, Any], task: str) -> float | None:
        record = best.get((run["name"], task))
        return record["test_acc_best"] if record else None

    # One private task per run keeps the single column, whichever task each run hides.
    columns = list(dict.fromkeys(t for run in runs for t in run["private"])) if _several_private(runs) else []
    private_head = "".join(f" private test acc, {t} |" for t in columns) or " private test acc |"
    # On unseen images: verification's test encodings of the run's first private task (verify.json
    # records of this version on); "—" for older records.
    lines = [f"| run | normalization | output var ~0 | output var < 0.5 | test var ~0 | test var < 0.5 "
             f"| test spread ~0 | test spread < 0.5 |{private_head} desirable test acc |",
             "|---" * (9 + max(1, len(columns))) + "|"]
    rows = []
    for run in runs:
        private_tests = {task: test_acc(run, task) for task in run["private"]}
        row = {"run": run["name"], "norm": run["norm"], "zero_var": run["collapse_zero_var_frac"],
               "low_var": run["collapse_low_var_frac"],
               "private_test": private_tests[run["private"][0]],  # the first private task
               "private_tests": private_tests,
               "desirable_test": test_acc(run, run["desirable"][0]) if run["desirable"] else None,
               "audit_private_tests": {task: audits[(run["name"], task)]["test_acc"] for task in run["private"]
                                       if (run["name"], task) in audits}}
        unseen = best.get((run["name"], run["private"][0])) or {}
        row["test_zero_var"] = unseen.get("test_collapse_zero_var_frac")
        row["test_low_var"] = unseen.get("test_collapse_low_var_frac")
        row["test_zero_spread"] = unseen.get("test_collapse_zero_spread_frac")
        row["test_low_spread"] = unseen.get("test_collapse_low_spread_frac")
        rows.append(row)
        # "—" also in the column of a task that another run hides and this one does not
        private_cells = [_ablation_private_cell(row, t) for t in columns] or \
            [_ablation_private_cell(row, run["private"][0])]
        lines.append(f"| {run['name']} | {run['norm']} | {_pct(row['zero_var'])} | {_pct(row['low_var'])} | "
                     f"{_pct(row['test_zero_var'])} | {_pct(row['test_low_var'])} | "
                     f"{_pct(row['test_zero_spread'])} | {_pct(row['test_low_spread'])} | "
                     + " | ".join(private_cells) + f" | {_pct(row['desirable_test'])} |")
    if any(row["audit_private_tests"] for row in rows):
        lines += ["", AUDIT_NOTE.replace(", whose number follows in parentheses where shown", "")]
    return "\n".join(lines), rows


def _ablation_private_cell(row: dict[str, Any], task: str) -> str:
    audited = row["audit_private_tests"].get(task)
    return _pct(row["private_tests"].get(task)) if audited is None else f"{_pct(audited)}†"


# --------------------------------------------------------------------------- tables over training seeds


SEEDED_NOTE = ("Runs that differ only in `train.seed` are one configuration, a row named after its lowest seed's "
               "run. A cell is the mean ± sd over the configuration's seeds (sample sd; \"seeds\" gives n and "
               "which, \"(n=k)\" a cell that fewer seeds have); one number without ± comes from one seed. The "
               "tables over seeds show balanced accuracy (mean per-class recall, chance 1/K) of the strongest "
               "attacker chosen on validation; every seed's own number with its bootstrap 95% interval is in the "
               "per-seed table.")


def _stats(prefix: str, values: list[float | None]) -> dict[str, Any]:
    """``prefix_mean``, ``prefix_sd`` and ``prefix_n`` of :func:`privenc.seeds.spread`."""
    return {f"{prefix}_{key}": value for key, value in spread(values).items()}


def _mean_sd(row: dict[str, Any], prefix: str, n_seeds: int, scale: float = 100, digits: int = 1,
             unit: str = "%") -> str:
    """A table cell: '61.0% ± 3.2', one seed's '61.0%', '—' for none; '(n=k)' where fewer seeds have it."""
    mean, sd, n = row[f"{prefix}_mean"], row[f"{prefix}_sd"], row[f"{prefix}_n"]
    if mean is None:
        return "—"
    text = f"{scale * mean:.{digits}f}{unit}" + ("" if sd is None else f" ± {scale * sd:.{digits}f}")
    return text + ("" if n == n_seeds else f" (n={n})")


def _seeds_cell(seeds: list[int]) -> str:
    """n and which seeds: '3 (0, 1, 2)'."""
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def _seed_numbers(group: dict[str, Any], task: str, best: dict[tuple[str, str], dict[str, Any]],
                  audits: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Each seed's number on ``task`` (:func:`privenc.seeds.seed_number`); the audit's worst
    case counts for a private task only."""
    numbers = []
    for run in group["runs"]:
        record = best.get((run["name"], task))
        numbers.append(seed_number(record, audits.get((run["name"], task)) if task in run["private"] else None))
    return numbers


def _number_stats(numbers: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd of the shown number (the worst case where audited), of plain verification's
    and of the audits', and how many seeds were audited: report.json keeps all of them."""
    return {**_stats("test_bacc", [n["test_bacc"] for n in numbers]),
            **_stats("verify_test_bacc", [n["verify_test_bacc"] for n in numbers]),
            **_stats("audit_test_bacc", [n["audit_test_bacc"] for n in numbers]),
            "audited_seeds": sum(n["source"] == "audit" for n in numbers)}


def _shown(row: dict[str, Any], n_seeds: int) -> str:
    """The shown number, with † and plain verification's in parentheses where some seed was audited."""
    text = _mean_sd(row, "test_bacc", n_seeds)
    if not row["audited_seeds"]:
        return text
    return f"{text}† ({_partly_audited(row)}verify {_mean_sd(row, 'verify_test_bacc', n_seeds)})"


def _partly_audited(row: dict[str, Any]) -> str:
    """'1 of 3 seeds audited; ' where the mean mixes audited and plain numbers, else ''."""
    audited, n = row["audited_seeds"], row["test_bacc_n"]
    return "" if audited == n else f"{audited} of {n} seeds audited; "


def _group_head(group: dict[str, Any]) -> dict[str, Any]:
    return {"configuration": group["name"], "runs": [run["name"] for run in group["runs"]], "seeds": group["seeds"],
            "n_seeds": len(group["runs"])}


def table1_seeded(groups: list[dict[str, Any]], records: list[dict[str, Any]],
                  audits: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Table 1 over training seeds: one row per configuration and private task, each cell the
    mean ± sd over its seeds."""
    best = strongest(records)
    rows = []
    for group in groups:
        first = group["runs"][0]
        for task in first["private"]:
            numbers = _seed_numbers(group, task, best, audits)
            plain = [best.get((run["name"], task)) or {} for run in group["runs"]]
            rows.append({
                **_group_head(group), "encoder": encoder_label(first), "encoder_loss": first["encoder_loss"],
                "task": task,
                **_stats("within_training_val", [run["within_val_private_accs"][task] for run in group["runs"]]),
                **_stats("verified_val_bacc", [r.get("val_bacc_best") for r in plain]),
                **_number_stats(numbers),
                "bacc_chance": next((r["bacc_chance"] for r in plain if r.get("bacc_chance") is not None), None),
            })
    named = _several_private([g["runs"][0] for g in groups])
    task_head, task_rule = (" private task |", "---|") if named else ("", "")
    lines = [f"| configuration | encoder | encoder loss |{task_head} seeds | within training, val "
             "| verification, val balanced | verification, test balanced | chance (1/K) |",
             f"|---|---|---|{task_rule}---|---|---|---|---|"]
    for r in rows:
        task_cell = f" {r['task']} |" if named else ""
        n = r["n_seeds"]
        lines.append(f"| {r['configuration']} | {r['encoder']} | {r['encoder_loss']} |{task_cell} "
                     f"{_seeds_cell(r['seeds'])} "
                     f"| {_mean_sd(r, 'within_training_val', n)} | {_mean_sd(r, 'verified_val_bacc', n)} "
                     f"| {_shown(r, n)} | {_pct(r['bacc_chance'])} |")
    if any(r["audited_seeds"] for r in rows):
        lines += ["", AUDIT_NOTE]
    return "\n".join(lines), rows


def table2_seeded(groups: list[dict[str, Any]], runs: list[dict[str, Any]], records: list[dict[str, Any]],
                  audits: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Table 2 over training seeds: a row per configuration (and per reference encoder, which
    has no seeds), each cell the mean ± sd of the strongest attacker's test balanced accuracy."""
    best = strongest(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    encoders, labels = _table2_encoders(runs, records)
    group_of = {run["name"]: group for group in groups for run in group["runs"]}
    rows, lines, shown_groups = [], ["| encoder | seeds | " + " | ".join(tasks) + " |",
                                     "|---" * (len(tasks) + 2) + "|"], set()
    for enc in encoders:
        group = group_of.get(enc)
        if group is not None and group["name"] in shown_groups:
            continue  # a later seed of a configuration already shown
        if group is None:  # a reference (Identity, Blur, LEACE) or a verify folder given without its run
            group = {"name": enc, "runs": [{"name": enc, "private": []}], "seeds": []}
        shown_groups.add(group["name"])
        row = {**_group_head(group), "encoder": group["name"], "label": labels.get(enc, enc), "cells": {}}
        cells = []
        for task in tasks:
            plain = [best.get((run["name"], task)) for run in group["runs"]]
            found = [r for r in plain if r is not None]
            if not found:
                cells.append("—")
                continue
            numbers = _seed_numbers(group, task, best, audits)
            cell = {"role": found[0]["role"], **_number_stats(numbers),
                    "saturated": all(r["saturated"] for r in found), "bacc_chance": found[0].get("bacc_chance")}
            if len(group["runs"]) == 1:  # one seed: its own interval
                cell.update(test_bacc_lo=numbers[0]["test_bacc_lo"], test_bacc_hi=numbers[0]["test_bacc_hi"])
            row["cells"][task] = cell
            mark = {"private": "−", "desirable": "+"}.get(cell["role"], "")
            text = _mean_sd(cell, "test_bacc", len(group["runs"]), scale=1, digits=3, unit="")
            marks = ("" if cell["saturated"] else "*") + ("†" if cell["audited_seeds"] else "")
            if cell["audited_seeds"] and _partly_audited(cell):
                marks += f" ({_partly_audited(cell)[:-2]})"
            interval = ("" if cell.get("test_bacc_lo") is None
                        else f" [{cell['test_bacc_lo']:.3f}, {cell['test_bacc_hi']:.3f}]")
            cells.append(f"{mark}{text}{marks}{interval}")
        labelled = enc in labels and enc not in ("identity", "blur")
        name = f"{group['name']} ({labels[enc]})" if labelled else group["name"]
        seeds = _seeds_cell(group["seeds"]) if group["seeds"] else "—"
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
        rows.append(row)
    lines += ["", "Test balanced accuracy of the strongest attacker, mean ± sd over seeds; one seed: its number "
              "[bootstrap 95% interval]. − = a private task of that encoder, + = a desirable task; * = some "
              "seed's attacker not saturated."]
    if any(cell["audited_seeds"] for row in rows for cell in row["cells"].values()):
        lines += ["", AUDIT_NOTE]
    return "\n".join(lines), rows


def ablation_seeded(groups: list[dict[str, Any]], records: list[dict[str, Any]],
                    audits: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The normalization ablation over training seeds: a row per configuration, the collapse
    diagnostics and the test balanced accuracies as mean ± sd over its seeds."""
    best = strongest(records)
    firsts = [group["runs"][0] for group in groups]
    columns = list(dict.fromkeys(t for run in firsts for t in run["private"])) if _several_private(firsts) else []
    private_head = "".join(f" private test bal. acc, {t} |" for t in columns) or " private test bal. acc |"
    lines = [f"| configuration | normalization | seeds | output var ~0 | output var < 0.5 | test var ~0 "
             f"| test var < 0.5 | test spread ~0 | test spread < 0.5 |{private_head} desirable test bal. acc |",
             "|---" * (10 + max(1, len(columns))) + "|"]
    rows = []
    for group in groups:
        first, members = group["runs"][0], group["runs"]
        unseen = [best.get((run["name"], first["private"][0])) or {} for run in members]
        row = {**_group_head(group), "norm": first["norm"],
               **_stats("zero_var", [run["collapse_zero_var_frac"] for run in members]),
               **_stats("low_var", [run["collapse_low_var_frac"] for run in members]),
               **_stats("test_zero_var", [r.get("test_collapse_zero_var_frac") for r in unseen]),
               **_stats("test_low_var", [r.get("test_collapse_low_var_frac") for r in unseen]),
               **_stats("test_zero_spread", [r.get("test_collapse_zero_spread_frac") for r in unseen]),
               **_stats("test_low_spread", [r.get("test_collapse_low_spread_frac") for r in unseen]),
               "private_tests": {task: _number_stats(_seed_numbers(group, task, best, audits))
                                 for task in first["private"]},
               "desirable_test": _number_stats(_seed_numbers(group, first["desirable"][0], best, audits))
               if first["desirable"] else None}
        rows.append(row)
        n = row["n_seeds"]

        def private(task: str, row: dict[str, Any] = row, n: int = n) -> str:
            return _shown(row["private_tests"][task], n) if task in row["private_tests"] else "—"

        desirable = "—" if row["desirable_test"] is None else _mean_sd(row["desirable_test"], "test_bacc", n)
        lines.append(f"| {row['configuration']} | {row['norm']} | {_seeds_cell(group['seeds'])} "
                     + "".join(f"| {_mean_sd(row, key, n)} " for key in ("zero_var", "low_var", "test_zero_var",
                                                                          "test_low_var", "test_zero_spread",
                                                                          "test_low_spread"))
                     + "| " + " | ".join([private(t) for t in columns] or [private(first["private"][0])])
                     + f" | {desirable} |")
    if any(stats["audited_seeds"] for row in rows for stats in row["private_tests"].values()):
        lines += ["", AUDIT_NOTE]
    return "\n".join(lines), rows


def per_seed_table(groups: list[dict[str, Any]], records: list[dict[str, Any]],
                   audits: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Every seed's number behind the tables over seeds: one row per configuration, task and
    seed, its test balanced accuracy with the bootstrap 95% interval (the audit's worst case
    where audited, with plain verification's beside)."""
    best = strongest(records)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows = []
    for group in groups:
        for task in tasks:
            numbers = _seed_numbers(group, task, best, audits)
            for run, number in zip(group["runs"], numbers):
                if number["source"] is None:
                    continue
                role = (best.get((run["name"], task)) or {}).get("role", "private")
                rows.append({"configuration": group["name"], "run": run["name"], "seed": run["config"].train.seed,
                             "task": task, "role": role, **number})
    lines = ["| configuration | task | role | seed | run | test balanced (95% CI) |", "|---|---|---|---|---|---|"]
    for r in rows:
        text = f"{_pct(r['test_bacc'])}{_interval(r['test_bacc_lo'], r['test_bacc_hi'])}"
        if r["source"] == "audit":
            text += (f"† (verify {_pct(r['verify_test_bacc'])}"
                     f"{_interval(r['verify_test_bacc_lo'], r['verify_test_bacc_hi'])})")
        lines.append(f"| {r['configuration']} | {r['task']} | {r['role']} | {r['seed']} | {r['run']} | {text} |")
    if any(r["source"] == "audit" for r in rows):
        lines += ["", AUDIT_NOTE]
    return "\n".join(lines), rows


# --------------------------------------------------------------------------- CSV


# Balanced-accuracy columns come last, so that readers of the earlier columns keep working.
TABLE1_COLUMNS = ["run", "encoder", "encoder_loss", "task", "within_training_val", "verified_val", "verified_test",
                  "verified_test_ci95", "verified_saturated", "verified_val_bacc", "verified_test_bacc",
                  "verified_test_bacc_lo", "verified_test_bacc_hi", "majority_rate"]
TABLE2_COLUMNS = ["encoder", "label", "task", "role", "test_acc", "ci95", "n_test", "saturated", "chance",
                  "info_bits", "test_bacc", "test_bacc_lo", "test_bacc_hi", "bacc_chance"]
ABLATION_COLUMNS = ["run", "norm", "zero_var", "low_var", "private_task", "private_test", "desirable_test",
                    "test_zero_var", "test_low_var", "test_zero_spread", "test_low_spread"]
# An audit's worst case beside plain verification's numbers (empty where not audited), last again.
AUDIT_COLUMNS = ["audit_test_bacc", "audit_test_bacc_lo", "audit_test_bacc_hi", "audit_test_acc", "audit_attack",
                 "audit_converged"]
TABLE1_COLUMNS += AUDIT_COLUMNS
TABLE2_COLUMNS += AUDIT_COLUMNS
ABLATION_COLUMNS += ["audit_private_test"]
# Over training seeds: a configuration's runs and seeds (space-separated), then mean and sd.
_SPREAD = ["test_bacc_mean", "test_bacc_sd", "test_bacc_n", "verify_test_bacc_mean", "verify_test_bacc_sd",
           "audit_test_bacc_mean", "audit_test_bacc_sd", "audited_seeds"]
TABLE1_SEEDED_COLUMNS = ["configuration", "runs", "seeds", "n_seeds", "encoder", "encoder_loss", "task",
                         "within_training_val_mean", "within_training_val_sd", "verified_val_bacc_mean",
                         "verified_val_bacc_sd", *_SPREAD, "bacc_chance"]
TABLE2_SEEDED_COLUMNS = ["encoder", "label", "runs", "seeds", "n_seeds", "task", "role", *_SPREAD, "test_bacc_lo",
                         "test_bacc_hi", "saturated", "bacc_chance"]
ABLATION_SEEDED_COLUMNS = ["configuration", "runs", "seeds", "n_seeds", "norm", "zero_var_mean", "zero_var_sd",
                           "low_var_mean", "low_var_sd", "test_zero_var_mean", "test_zero_var_sd",
                           "test_low_var_mean", "test_low_var_sd", "test_zero_spread_mean", "test_zero_spread_sd",
                           "test_low_spread_mean", "test_low_spread_sd", "private_task",
                           *(f"private_{c}" for c in _SPREAD), "desirable_test_bacc_mean", "desirable_test_bacc_sd"]
SEEDS_COLUMNS = ["configuration", "run", "seed", "task", "role", "source", "test_bacc", "test_bacc_lo",
                 "test_bacc_hi", "test_acc", "verify_test_bacc", "verify_test_bacc_lo", "verify_test_bacc_hi",
                 "verify_test_acc", *AUDIT_COLUMNS]


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A header row, then one line per row: numbers as report.json holds them (accuracies as
    fractions, full precision), an empty field for a missing value, true/false for flags."""
    def field(value: Any) -> Any:
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):  # a configuration's runs or seeds
            return " ".join(map(str, value))
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


def table2_seeded_long(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table 2 over seeds as one flat row per configuration (or reference) and task."""
    return [{"encoder": row["encoder"], "label": row["label"], "runs": row["runs"], "seeds": row["seeds"],
             "n_seeds": row["n_seeds"], "task": task, **cell}
            for row in rows for task, cell in row["cells"].items()]


def ablation_seeded_long(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation over seeds as one flat row per configuration and private task."""
    desirable = [{} if row["desirable_test"] is None else row["desirable_test"] for row in rows]
    return [{**row, "private_task": task, **{f"private_{key}": value for key, value in stats.items()},
             "desirable_test_bacc_mean": d.get("test_bacc_mean"), "desirable_test_bacc_sd": d.get("test_bacc_sd")}
            for row, d in zip(rows, desirable) for task, stats in row["private_tests"].items()]


def ablation_long(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ablation as one flat row per run and private task (the diagnostics repeat)."""
    return [{**row, "private_task": task, "private_test": acc,
             "audit_private_test": row["audit_private_tests"].get(task)}
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
    audits = read_audits(inputs)
    groups = group_runs(runs)
    # Over training seeds only where some configuration has several: one seed each looks as before.
    seeded = any(len(group["runs"]) > 1 for group in groups)
    if seeded:
        t1, t1_rows = table1_seeded(groups, records, audits)
        t2, t2_rows = table2_seeded(groups, runs, records, audits)
        ab, ab_rows = ablation_seeded(groups, records, audits)
        ps, ps_rows = per_seed_table(groups, records, audits)
    else:
        t1, t1_rows = table1(runs, records, audits)
        t2, t2_rows = table2(runs, records, audits)
        ab, ab_rows = ablation_table(runs, records, audits)
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
    if seeded:
        sections += ["## Training seeds", "", SEEDED_NOTE, ""]
    if runs:
        verification = ("Verification: the strongest fresh attacker (selected by validation balanced accuracy) on "
                        "the fixed encoder, its balanced accuracy; chance is 1/K." if seeded else
                        "Verification: the strongest fresh attacker "
                        "(selected by validation balanced accuracy) on the fixed encoder: accuracy with the 95% Wilson "
                        "interval, and balanced accuracy with a bootstrap 95% interval over the test images; the "
                        "majority rate is accuracy's chance level, 1/K balanced accuracy's.")
        sections += ["## Table 1 — private-task accuracy within adversarial training vs after verification", "",
                     "Within training: the adversarially trained private classifier on validation images, balanced "
                     "accuracy (mean per-class recall; chance 1/K), mean of the last quarter of logged evaluations. "
                     + verification, "", t1, ""]
    if records:
        sections += ["## Table 2 — test accuracy under the verification protocol", "",
                     "Strongest attacker (selected on validation balanced accuracy), its test balanced accuracy over "
                     "the training seeds of each configuration." if seeded else
                     "Strongest attacker (selected on validation balanced accuracy), test accuracy ± the half-width "
                     "of its 95% Wilson interval from the number of test images; then its balanced accuracy (mean "
                     "per-class recall, chance 1/K) with a bootstrap 95% interval over the test images.",
                     "", t2, ""]
    if runs:
        sections += ["## Normalization ablation — collapse diagnostics", "",
                     "Fraction of pre-tanh output elements whose variance over images is ~0 (< 1e-4) and < 0.5; "
                     "the variance constraint asks for 1. \"output var\": the validation batches of training's "
                     "last log; \"test var\": the test images of the run's first private task, as verification "
                     "encodes them (images the encoder never trained on). \"test spread\": the same with each "
                     "element's interquartile range in place of its variance (((q75 - q25) / 1.349)^2, a normal "
                     "distribution's variance): an element constant for most images and far off for a few keeps "
                     "unit variance but has spread ~0.", "", ab, ""]
    if seeded:
        sections += ["## Per seed — every training seed's number", "",
                     "Test balanced accuracy of each run (one training seed) with its bootstrap 95% interval over "
                     "the test images: the numbers behind the means above.", "", ps, ""]
    # One CSV per table shown, in the long form that report.json's rows have.
    tables = {}
    if runs:
        tables["report_table1.csv"] = csv_text(TABLE1_SEEDED_COLUMNS if seeded else TABLE1_COLUMNS, t1_rows)
        tables["report_ablation.csv"] = (csv_text(ABLATION_SEEDED_COLUMNS, ablation_seeded_long(ab_rows)) if seeded
                                         else csv_text(ABLATION_COLUMNS, ablation_long(ab_rows)))
    if records:
        tables["report_table2.csv"] = (csv_text(TABLE2_SEEDED_COLUMNS, table2_seeded_long(t2_rows)) if seeded
                                       else csv_text(TABLE2_COLUMNS, table2_long(t2_rows)))
    if seeded:
        tables["report_seeds.csv"] = csv_text(SEEDS_COLUMNS, ps_rows)
    rows_are = ("per configuration (its runs and seeds space-separated) and private task or task, and per seed"
                if seeded else "per run and private task, or per encoder and task")
    sections += [f"Tables as CSV (one row {rows_are}; accuracies as fractions): "
                 + ", ".join(f"[{name}]({name})" for name in sorted(tables)), ""]
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
    report = {"seeded": seeded, "table1": t1_rows, "table2": t2_rows, "ablation": ab_rows,
              "per_seed": ps_rows if seeded else [],
              "configurations": [{"name": g["name"], "runs": [run["name"] for run in g["runs"]], "seeds": g["seeds"]}
                                 for g in groups],
              "audits": [{"encoder": encoder, "task": task, **worst} for (encoder, task), worst in audits.items()],
              "figures": pictures, "csv": sorted(tables),
              "sweeps": [{"folder": str(folder), "front": sweep["front"]} for folder, sweep in sweeps],
              "runs": [{k: v for k, v in run.items() if k not in ("config", "metrics")} for run in runs],
              "records": records}
    for name in ("report_table1.csv", "report_table2.csv", "report_ablation.csv", "report_seeds.csv"):
        # a table left by an earlier report into this folder would contradict this one
        if name in tables:
            atomic_write_text(out_dir / name, tables[name])
        else:
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(out_dir / "report.md", "\n".join(sections))
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    return report
