"""The demo pipeline end to end on tiny settings, and a rerun that reuses it."""

from conftest import TINY

from privenc.config import load_config
from privenc.demo import run_demo


def test_the_demo_end_to_end_and_its_rerun(tmp_path):
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

