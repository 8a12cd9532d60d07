"""Training seeds and audits in the report (issue 17).

One training run measures an adversarial loss only to within several points (docs/results.md:
seed-to-seed differences of up to 29 points at the demo's schedule), so the report treats runs
that differ only in ``train.seed`` as one *configuration* and shows the mean ± sd over its seeds,
with every seed's own number and bootstrap interval beside. And plain verification was measured
far too optimistic on real photos (issue 16), so where an audit of a run is among the report's
inputs, its worst case (``privenc audit``, chosen on validation over the zoo and the extra
attacks) is the number of the run's private task; plain verification's stays in report.json.

Everything here is read from folders: run configs, verify.json records, audit.json verdicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from privenc.audit import AUDIT_FILE, PLAN_FILE
from privenc.config import Config

SEED_KEY = "train.seed"
"""What may differ between the runs of one configuration: the training seed alone."""


def configuration_key(config: Config) -> str:
    """A run's whole config without ``train.seed``: runs with equal keys are seeds of one
    configuration (a setting changed by hand, a different data split or schedule is not)."""
    values = config.to_dict()
    values["train"] = {key: value for key, value in values["train"].items() if key != "seed"}
    return json.dumps(values, sort_keys=True, default=str)


def group_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The configurations of ``runs`` (as :func:`privenc.report.read_folders` reads them), in
    the order of their first run: each ``{"name", "runs", "seeds"}``, its runs sorted by seed
    and named after the lowest seed's run (the plain name ``reproduce.py`` gives the first seed)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(configuration_key(run["config"]), []).append(run)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda run: run["config"].train.seed)
        out.append({"name": members[0]["name"], "runs": members,
                    "seeds": [run["config"].train.seed for run in members]})
    return out


def is_audit_folder(folder: Path) -> bool:
    """Whether ``folder`` is an audit's output (finished, or with its plan written): the
    verify.json of Identity it may hold is the audit's reference, not a grid cell."""
    return (folder / AUDIT_FILE).is_file() or (folder / PLAN_FILE).is_file()


def read_audits(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (encoder, private task): the worst case of the audits found under ``paths``
    (audit.json, searched recursively), flattened to the numbers the tables show. An encoder
    audited twice on a task (two folders) keeps the worst case chosen on validation, as an
    audit chooses among its attackers."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for root in paths:
        for path in sorted(Path(root).rglob(AUDIT_FILE)):
            result = json.loads(path.read_text())
            for task, verdict in result["verdicts"].items():
                if verdict["role"] != "private":  # a desirable task's best attacker is utility, not a leak
                    continue
                worst = worst_case(verdict, path.parent)
                key = (result["encoder"], task)
                if key not in found or worst["val_bacc"] > found[key]["val_bacc"]:
                    found[key] = worst
    return found


def worst_case(verdict: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One audit verdict's worst case as the report quotes it (see :func:`privenc.verdict.verdict`)."""
    w = verdict["worst_case"]
    lo, hi = w["test_bacc_ci95"]
    return {"test_bacc": w["test_bacc_best"], "test_bacc_lo": lo, "test_bacc_hi": hi,
            "test_acc": w["test_acc_best"], "val_bacc": w["val_bacc_best"], "attack": w["attack"],
            "attacker": w["attacker"], "saturated": w["saturated"], "converged": verdict["converged"],
            "n_test": verdict["n_test"], "bacc_chance": verdict["bacc_chance"],
            "plain_verify_test_bacc": verdict["plain_verify_test_bacc"], "folder": str(folder)}


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; None for one value) and n of the values that are
    there (None: a seed without that number, e.g. not verified on the task)."""
    there = [v for v in values if v is not None]
    if not there:
        return {"mean": None, "sd": None, "n": 0}
    mean = sum(there) / len(there)
    sd = math.sqrt(sum((v - mean) ** 2 for v in there) / (len(there) - 1)) if len(there) > 1 else None
    return {"mean": mean, "sd": sd, "n": len(there)}


def seed_number(record: dict[str, Any] | None, audit: dict[str, Any] | None) -> dict[str, Any]:
    """One run's number on one task: the audit's worst case where there is one, else plain
    verification's strongest attacker (test balanced accuracy and its bootstrap interval), with
    both sources kept. ``record``: the strongest verify record (None: not verified)."""
    plain = record or {}
    lo, hi = plain.get("test_bacc_ci95") or (None, None)
    number = {"verify_test_bacc": plain.get("test_bacc_best"), "verify_test_bacc_lo": lo,
              "verify_test_bacc_hi": hi, "verify_test_acc": plain.get("test_acc_best"),
              "audit_test_bacc": None, "audit_test_bacc_lo": None, "audit_test_bacc_hi": None,
              "audit_test_acc": None, "audit_attack": None, "audit_converged": None}
    if audit is not None:
        number.update({"audit_test_bacc": audit["test_bacc"], "audit_test_bacc_lo": audit["test_bacc_lo"],
                       "audit_test_bacc_hi": audit["test_bacc_hi"], "audit_test_acc": audit["test_acc"],
                       "audit_attack": audit["attack"], "audit_converged": audit["converged"]})
    source = "audit" if audit is not None else "verify" if record is not None else None
    prefix = f"{source}_" if source else "verify_"
    number.update({"source": source, "test_bacc": number[f"{prefix}test_bacc"],
                   "test_bacc_lo": number[f"{prefix}test_bacc_lo"], "test_bacc_hi": number[f"{prefix}test_bacc_hi"],
                   "test_acc": number[f"{prefix}test_acc"]})
    return number
