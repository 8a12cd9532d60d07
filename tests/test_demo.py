"""The demo pipeline end to end on tiny settings, a rerun that reuses it, and the benchmark that
accounts for its time (benchmarks/demo_budget.py)."""

import importlib
import json
from pathlib import Path

from conftest import TINY

from privenc.config import load_config
from privenc.demo import run_demo

BUDGET = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_budget.py"


def test_the_demo_end_to_end_its_rerun_and_its_time_budget(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    report = run_demo(out, load_config("demo", TINY), jobs=1, progress=False)
    table = report.read_text().split("## Table 2")[1]
    for row in ("| identity |", "| blur |", "| label_flip (-g1c0 +g1c1) |", "| standard_gan (-g1c0 +g1c1) |"):
        assert row in table, row
    cells = sorted((out / "grid" / "cells").glob("*/verify.json"))
    assert len(cells) == 12  # 4 encoders x (private, desirable, one other task)
    stamps = [c.stat().st_mtime_ns for c in cells]
    run_demo(out, load_config("demo", TINY), jobs=1, progress=False)
    assert [c.stat().st_mtime_ns for c in cells] == stamps  # everything finished is reused

    monkeypatch.syspath_prepend(str(BUDGET.parent))  # importable by name: its yardstick runs in spawned processes
    budget = importlib.import_module("demo_budget")
    text = budget.budget(out, seconds=0.05)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| train ") or line.startswith("| cell ")}
    assert len(rows) == 14
    assert rows["train label_flip"][1] == "9"  # 3 warm-up + 6 adversarial iterations
    record = json.loads((out / "grid" / "cells" / "identity__g1c0" / "verify.json").read_text())[0]
    identity, learned = rows["cell identity__g1c0 (paper)"], rows["cell label_flip__g1c0 (paper)"]
    assert identity[1] == str(record["iters"])
    per_iteration = {name: float(r[2].replace(",", "")) / int(r[1]) for name, r in
                     (("identity", identity), ("learned", learned))}
    assert per_iteration["identity"] > 4 * per_iteration["learned"]  # raw 16x16 images vs 4x4 encodings


def test_the_budget_adds_up_the_sessions_of_a_resumed_training(monkeypatch):
    monkeypatch.syspath_prepend(str(BUDGET.parent))
    budget = importlib.import_module("demo_budget")
    log = [{"elapsed_s": t} for t in (10.0, 20.0, 4.0, 9.0)]  # resumed after 20 s, 9 s more
    assert budget.training_seconds(log) == 29.0
    assert budget.training_seconds(log[:2]) == 20.0
