"""The report: its CSV tables hold report.json's numbers, and every private task of a run is shown.

Run folders are written by hand (config, metrics log, verification records), so that each
number in the tables is known in advance and a report takes milliseconds; one test trains a
tiny encoder with two private tasks to tie the report to the metrics training really logs."""

import csv
import json
from pathlib import Path

import pytest

from conftest import TINY
from privenc.config import load_config
from privenc.report import AUDIT_COLUMNS, build_report
from privenc.runs import read_metrics, write_config
from privenc.training import train

TWO_PRIVATE = 'train.private=["g1c0", "g1c2"]'


def _run(folder: Path, overrides: list[str], private_accs: list[list[float]]) -> Path:
    """A finished label-flip run folder: its config and a metrics log of len(private_accs[0])
    evaluations."""
    folder.mkdir(parents=True)
    write_config(load_config("demo", [*TINY, "train.encoder_loss=label_flip", *overrides]), folder)
    lines = []
    for step, accs in enumerate(zip(*private_accs), 1):
        line = {"step": step, **{f"val_private{k}_acc": acc for k, acc in enumerate(accs)},
                "val_desirable_acc": 0.75, "collapse_zero_var_frac": 0.125, "collapse_low_var_frac": 0.5}
        lines.append(json.dumps(line))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _record(encoder: str, task: str, role: str, val: float, test: float, attacker: str = "paper") -> dict:
    return {"encoder": encoder, "task": task, "role": role, "attacker": attacker, "seed": 0,
            "val_acc_best": val, "test_acc_best": test, "test_acc_final": test, "n_test": 40,
            "saturated": True, "chance": 0.5, "info_bits": 0.25, "iters": 12, "curve": [[2, val]]}


def _verified(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "verify.json").write_text(json.dumps(records))
    return folder


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def _number(text: str):
    """A CSV field back as report.json holds it."""
    flags = {"": None, "true": True, "false": False}
    return flags[text] if text in flags else float(text)


@pytest.fixture
def one_private(tmp_path) -> list[Path]:
    run = _run(tmp_path / "in" / "one", [], [[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.625, 0.875]])
    unseen = {"test_collapse_zero_var_frac": 0.0625, "test_collapse_low_var_frac": 0.25,  # verification's test images
              "test_collapse_zero_spread_frac": 0.125, "test_collapse_low_spread_frac": 0.5}
    records = [_record("one", "g1c0", "private", 0.6, 0.55),
               {**_record("one", "g1c0", "private", 0.7, 0.65, "resnet"), **unseen},
               _record("one", "g1c1", "desirable", 0.8, 0.85), _record("identity", "g1c0", "other", 0.9, 0.95)]
    return [run, _verified(tmp_path / "in" / "v", records)]


@pytest.fixture
def two_private(tmp_path) -> list[Path]:
    run = _run(tmp_path / "in" / "two", [TWO_PRIVATE],
               [[0.5] * 6 + [0.625, 0.875], [0.5] * 6 + [0.25, 0.375]])
    records = [_record("two", "g1c0", "private", 0.6, 0.55), _record("two", "g1c2", "private", 0.7, 0.45),
               _record("two", "g1c1", "desirable", 0.8, 0.85)]
    return [run, _verified(tmp_path / "in" / "v2", records)]


def test_each_table_is_a_csv_holding_the_numbers_of_report_json(one_private, tmp_path):
    out = tmp_path / "report"
    build_report(one_private, out, figures=False)
    saved = json.loads((out / "report.json").read_text())
    assert saved["csv"] == ["report_ablation.csv", "report_table1.csv", "report_table2.csv"]
    text = (out / "report.md").read_text()
    assert all(f"[{name}]({name})" in text for name in saved["csv"])

    columns, rows = _csv(out / "report_table1.csv")
    assert columns == ["run", "encoder", "encoder_loss", "task", "within_training_val", "verified_val",
                       "verified_test", "verified_test_ci95", "verified_saturated", "verified_val_bacc",
                       "verified_test_bacc", "verified_test_bacc_lo", "verified_test_bacc_hi", "majority_rate",
                       *AUDIT_COLUMNS]
    assert len(rows) == len(saved["table1"]) == 1
    for row, expected in zip(rows, saved["table1"]):
        for column in columns:
            got = row[column] if column in ("run", "encoder", "encoder_loss", "task") else _number(row[column])
            assert got == expected[column], column
    # the strongest attacker on validation (resnet), as fractions; within training: the last quarter
    assert rows[0]["verified_test"] == "0.65" and float(rows[0]["within_training_val"]) == 0.75

    columns, rows = _csv(out / "report_table2.csv")
    assert columns == ["encoder", "label", "task", "role", "test_acc", "ci95", "n_test", "saturated", "chance",
                       "info_bits", "test_bacc", "test_bacc_lo", "test_bacc_hi", "bacc_chance", *AUDIT_COLUMNS]
    cells = {(r["encoder"], r["task"]): r for r in rows}
    assert set(cells) == {("identity", "g1c0"), ("one", "g1c0"), ("one", "g1c1")}
    for table_row in saved["table2"]:
        for task, cell in table_row["cells"].items():
            row = cells[(table_row["encoder"], task)]
            assert row["label"] == table_row["label"] and row["role"] == cell["role"]
            for key in ("test_acc", "ci95", "n_test", "saturated", "chance", "info_bits", "test_bacc", "test_bacc_lo",
                        "test_bacc_hi", "bacc_chance"):
                assert _number(row[key]) == cell[key], key

    columns, rows = _csv(out / "report_ablation.csv")
    assert columns == ["run", "norm", "zero_var", "low_var", "private_task", "private_test", "desirable_test",
                       "test_zero_var", "test_low_var", "test_zero_spread", "test_low_spread", "audit_private_test"]
    (row,), (expected,) = rows, saved["ablation"]
    assert row["private_task"] == "g1c0"
    for key in ("zero_var", "low_var", "private_test", "desirable_test", "test_zero_var", "test_low_var"):
        assert _number(row[key]) == expected[key], key
    assert (row["zero_var"], row["private_test"], row["desirable_test"]) == ("0.125", "0.65", "0.85")
    # on unseen images: from the strongest private attacker's record (the encoder's test encodings)
    assert (row["test_zero_var"], row["test_low_var"]) == ("0.0625", "0.25")
    assert (row["test_zero_spread"], row["test_low_spread"]) == ("0.125", "0.5")


def test_one_private_task_keeps_the_paper_shape(one_private, tmp_path):
    build_report(one_private, tmp_path / "report", figures=False)
    text = (tmp_path / "report" / "report.md").read_text()
    assert ("| run | encoder | encoder loss | within training, val | verification, val "
            "| verification, test (95% CI) | verification, val balanced | verification, test balanced (95% CI) "
            "| majority rate |\n|---|---|---|---|---|---|---|---|---|\n| one | -g1c0 +g1c1 | label_flip | 75.0% "
            "| 70.0% | 65.0% ± ") in text
    assert ("| run | normalization | output var ~0 | output var < 0.5 | test var ~0 | test var < 0.5 "
            "| test spread ~0 | test spread < 0.5 | private test acc | desirable test acc |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n"
            "| one | per_location | 12.5% | 50.0% | 6.2% | 25.0% | 12.5% | 50.0% | 65.0% | 85.0% |") in text
    assert "| private task |" not in text and "private test acc," not in text


def test_every_private_task_has_a_table1_row_and_an_ablation_column(two_private, one_private, tmp_path):
    report = build_report(two_private + one_private[:1], tmp_path / "report", figures=False)
    # Table 1: one row per run and private task, each with its own within-training accuracy
    rows = {(r["run"], r["task"]): r for r in report["table1"]}
    assert list(rows) == [("two", "g1c0"), ("two", "g1c2"), ("one", "g1c0")]  # in the order given
    assert rows[("two", "g1c0")]["within_training_val"] == 0.75
    assert rows[("two", "g1c2")]["within_training_val"] == pytest.approx(0.3125)
    assert rows[("two", "g1c2")]["verified_test"] == 0.45
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| run | encoder | encoder loss | private task | within training, val |" in text
    assert "| two | -g1c0 -g1c2 +g1c1 | label_flip | g1c2 | 31.2% | 70.0% | 45.0% ± " in text
    assert "| one | -g1c0 +g1c1 | label_flip | g1c0 | 75.0% | — | — |" in text  # verified elsewhere only
    # the ablation: one row per run, one private column per private task ("—": not private to that run)
    assert ("| test spread < 0.5 | private test acc, g1c0 | private test acc, g1c2 | desirable test acc |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n") in text
    assert "| two | per_location | 12.5% | 50.0% | — | — | — | — | 55.0% | 45.0% | 85.0% |" in text
    assert "| one | per_location | 12.5% | 50.0% | — | — | — | — | — |" in text
    ablation = {r["run"]: r for r in report["ablation"]}
    assert ablation["two"]["private_tests"] == {"g1c0": 0.55, "g1c2": 0.45}
    assert ablation["two"]["private_test"] == 0.55  # the first private task, as before
    # and in the CSVs, one row per run and private task
    _, rows = _csv(tmp_path / "report" / "report_table1.csv")
    assert [(r["run"], r["task"], r["verified_test"]) for r in rows] == [
        ("two", "g1c0", "0.55"), ("two", "g1c2", "0.45"), ("one", "g1c0", "")]
    _, rows = _csv(tmp_path / "report" / "report_ablation.csv")
    assert [(r["run"], r["private_task"], r["private_test"]) for r in rows] == [
        ("two", "g1c0", "0.55"), ("two", "g1c2", "0.45"), ("one", "g1c0", "")]


def test_a_report_without_runs_writes_only_table2_and_drops_an_earlier_reports_csv(one_private, tmp_path):
    out = tmp_path / "report"
    build_report(one_private, out, figures=False)
    assert (out / "report_table1.csv").exists()
    report = build_report(one_private[1:], out, figures=False)  # verification records only
    assert report["csv"] == ["report_table2.csv"]
    assert sorted(p.name for p in out.glob("*.csv")) == ["report_table2.csv"]
    assert "report_table1.csv" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_trained_run_with_two_private_tasks_reports_both(tmp_path):
    """Ties the report to the keys training logs: val_private{k}_acc for the k-th private task."""
    config = load_config("demo", TINY + [TWO_PRIVATE])
    run = tmp_path / "run"
    train(config, run, progress=False)
    report = build_report([run], tmp_path / "report", figures=False)
    metrics = read_metrics(run / "metrics.jsonl")
    tail = metrics[-max(1, len(metrics) // 4):]
    logged = [m["val_private1_acc"] for m in tail if "val_private1_acc" in m]
    assert logged
    (first, second) = report["table1"]
    assert (first["task"], second["task"]) == ("g1c0", "g1c2")
    assert second["within_training_val"] == pytest.approx(sum(logged) / len(logged))
    _, rows = _csv(tmp_path / "report" / "report_table1.csv")
    assert [r["task"] for r in rows] == ["g1c0", "g1c2"]


def test_balanced_accuracy_reaches_both_tables_and_chooses_the_strongest(tmp_path):
    run = _run(tmp_path / "in" / "one", [], [[0.5] * 8])
    # resnet: better plain validation accuracy, paper: better balanced; paper must be the one shown
    paper = dict(_record("one", "g1c0", "private", 0.6, 0.55), val_bacc_best=0.62, test_bacc_best=0.58,
                 test_bacc_ci95=[0.47, 0.69], bacc_chance=0.5, chance=0.7)
    resnet = dict(_record("one", "g1c0", "private", 0.7, 0.65, "resnet"), val_bacc_best=0.52, test_bacc_best=0.51,
                  test_bacc_ci95=[0.45, 0.57], bacc_chance=0.5, chance=0.7)
    report = build_report([run, _verified(tmp_path / "in" / "v", [resnet, paper])], tmp_path / "r", figures=False)
    (row,) = report["table1"]
    assert (row["verified_test"], row["verified_test_bacc"], row["verified_test_bacc_lo"],
            row["verified_test_bacc_hi"], row["majority_rate"]) == (0.55, 0.58, 0.47, 0.69, 0.7)
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| 60.0% | 55.0% ± " in text and "| 62.0% | 58.0% [47.0, 69.0] | 70.0% |" in text
    assert "−0.550 ±0.15; bal. 0.580 [0.470, 0.690]" in text
    _, rows = _csv(tmp_path / "r" / "report_table2.csv")
    assert (rows[0]["test_bacc"], rows[0]["test_bacc_lo"], rows[0]["bacc_chance"]) == ("0.58", "0.47", "0.5")
