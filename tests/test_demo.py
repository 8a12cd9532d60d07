"""The demo pipeline end to end on tiny settings, and a rerun that reuses it."""

import pytest

from conftest import TINY
from privenc.config import load_config
from privenc.demo import run_demo
from privenc.grid import collect


@pytest.mark.slow
def test_the_demo_end_to_end_and_its_rerun(tmp_path):
    """jobs=2: the two encoders train in parallel processes, then the cells run in parallel;
    the rerun (jobs=1) with --other-task reuses every finished step and adds that column."""
    out = tmp_path / "demo"
    report = run_demo(out, load_config("demo", TINY), jobs=2, progress=False)
    text = report.read_text()
    assert "## Table 1" in text
    for loss in ("label_flip", "standard_gan"):
        assert (out / "runs" / loss / "encoder.pt").exists()
        assert f"| {loss} |" in text  # one Table 1 row per encoder loss
    table = text.split("## Table 2")[1]
    for row in ("| identity |", "| blur |", "| label_flip (-g1c0 +g1c1) |", "| standard_gan (-g1c0 +g1c1) |"):
        assert row in table, row
    records = collect(out / "grid")
    assert {r["encoder"] for r in records} == {"label_flip", "standard_gan", "identity", "blur"}
    assert {r["task"] for r in records} == {"g1c0", "g1c1"}  # private, desirable
    roles = {(r["encoder"], r["task"]): r["role"] for r in records}
    assert roles[("label_flip", "g1c0")] == "private" and roles[("label_flip", "g1c1")] == "desirable"
    assert {roles[("identity", t)] for t in ("g1c0", "g1c1")} == {"other"}  # baselines unmarked

    results = [out / "runs" / loss / "encoder.pt" for loss in ("label_flip", "standard_gan")]
    results += sorted((out / "grid" / "cells").glob("*/verify.json"))
    assert len(results) == 2 + 8  # 4 encoders x (private, desirable)
    stamps = [path.stat().st_mtime_ns for path in results]
    report = run_demo(out, load_config("demo", TINY), other_task="g1c2", jobs=1, progress=False)
    assert [path.stat().st_mtime_ns for path in results] == stamps  # everything finished is reused
    records = collect(out / "grid")
    assert {r["task"] for r in records} == {"g1c0", "g1c1", "g1c2"}
    assert {r["role"] for r in records if r["task"] == "g1c2"} == {"other"}  # trained against by no one
    assert "g1c2" in report.read_text().split("## Table 2")[1]
