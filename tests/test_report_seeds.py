"""The report over training seeds and audits (issue 17): runs that differ only in train.seed are
one configuration shown as mean ± sd, every seed's number is listed, one seed per configuration
renders as before, and an audit's worst case takes the place of its private task's cell.

Run folders, verify.json and audit.json are written by hand (the audit's verdict by the real
:func:`privenc.verdict.verdict`), so that every number is known in advance."""

import json
import math
from pathlib import Path

import pytest
from test_report import _csv, _record, _run, _verified

from privenc.report import build_report
from privenc.verdict import verdict


def _bacc(encoder: str, task: str, role: str, test_bacc: float, lo: float, hi: float, val_bacc: float = 0.6) -> dict:
    """A verify record whose strongest attacker has this test balanced accuracy and interval."""
    return dict(_record(encoder, task, role, val_bacc, test_bacc), val_bacc_best=val_bacc, test_bacc_best=test_bacc,
                test_bacc_ci95=[lo, hi], bacc_chance=0.5)


def _audit(folder: Path, encoder: str, task: str, role: str, test_bacc: float, lo: float, hi: float,
           plain: float) -> Path:
    """An audit folder: audit.json with the verdict of a round-0 attacker (plain verify's
    ``plain``) and a round-1 one that is the worst case; and the Identity reference the audit
    keeps in OUT/identity, which must not reach the tables."""
    base = {"encoder": encoder, "task": task, "role": role, "attack": "zoo", "seed": 0, "lr": 1e-3, "patience": 1,
            "views": 1, "iters": 12, "saturated": True, "info_bits": 0.1, "n_test": 40, "chance": 0.5,
            "bacc_chance": 0.5, "val_acc_best": 0.5}
    records = [dict(base, attacker="paper", round=0, val_bacc_best=0.55, test_bacc_best=plain, test_acc_best=plain,
                    test_bacc_ci95=[plain - 0.1, plain + 0.1]),
               dict(base, attacker="wide", round=1, val_bacc_best=0.9, test_bacc_best=test_bacc,
                    test_acc_best=test_bacc + 0.01, test_bacc_ci95=[lo, hi])]
    rounds = [{"round": 0, "rise": None}, {"round": 1, "rise": 0.35}]
    result = {"encoder": encoder, "tasks": [task],
              "verdicts": {task: verdict(task, role, records, rounds, "max_rounds", 1.0, None, None)}}
    folder.mkdir(parents=True)
    (folder / "audit.json").write_text(json.dumps(result))
    _verified(folder / "identity", [_bacc("identity", task, "other", 0.99, 0.98, 1.0, val_bacc=0.99)])
    return folder


@pytest.fixture
def two_seeds(tmp_path) -> list[Path]:
    """label flip at seeds 0 and 1 (one configuration), standard GAN at seed 0, and label flip
    at seed 1 with another alpha (another configuration, though only seed and alpha differ)."""
    runs = [_run(tmp_path / "in" / "lf", [], [[0.5] * 7 + [0.75]]),
            _run(tmp_path / "in" / "lf-seed1", ["train.seed=1"], [[0.5] * 7 + [0.25]]),
            _run(tmp_path / "in" / "sg", ['train.encoder_loss="standard_gan"'], [[0.5] * 8]),
            _run(tmp_path / "in" / "lf-alpha", ["train.seed=1", "train.alpha=0.25"], [[0.5] * 8])]
    records = [_bacc("lf", "g1c0", "private", 0.60, 0.50, 0.70), _bacc("lf-seed1", "g1c0", "private", 0.70, 0.62, 0.78),
               _bacc("lf", "g1c1", "desirable", 0.90, 0.85, 0.95),
               _bacc("lf-seed1", "g1c1", "desirable", 0.80, 0.72, 0.88),
               _bacc("sg", "g1c0", "private", 0.55, 0.45, 0.65), _bacc("lf-alpha", "g1c0", "private", 0.95, 0.9, 1.0),
               _bacc("identity", "g1c0", "other", 0.97, 0.94, 1.0)]
    return [*runs, _verified(tmp_path / "in" / "grid", records)]


def test_two_seeds_of_one_configuration_are_one_row_with_mean_and_sd(two_seeds, tmp_path):
    out = tmp_path / "report"
    report = build_report(two_seeds, out, figures=False)
    assert report["seeded"]
    assert [(c["name"], c["runs"], c["seeds"]) for c in report["configurations"]] == [
        ("lf", ["lf", "lf-seed1"], [0, 1]), ("sg", ["sg"], [0]), ("lf-alpha", ["lf-alpha"], [1])]
    rows = {r["configuration"]: r for r in report["table1"]}
    assert list(rows) == ["lf", "sg", "lf-alpha"]
    lf = rows["lf"]
    sd = math.sqrt(((0.60 - 0.65) ** 2 + (0.70 - 0.65) ** 2) / 1)  # sample sd, n - 1
    assert lf["test_bacc_mean"] == pytest.approx(0.65) and lf["test_bacc_sd"] == pytest.approx(sd)
    assert (lf["test_bacc_n"], lf["n_seeds"], lf["audited_seeds"]) == (2, 2, 0)
    # within training: the last quarter of each run's log (0.625 and 0.375), then over seeds
    assert lf["within_training_val_mean"] == pytest.approx(0.5)
    assert lf["within_training_val_sd"] == pytest.approx(math.sqrt(2 * 0.125 ** 2))
    assert rows["sg"]["test_bacc_sd"] is None and rows["sg"]["test_bacc_mean"] == 0.55

    text = (out / "report.md").read_text()
    assert "| lf | -g1c0 +g1c1 | label_flip | 2 (0, 1) | 50.0% ± 17.7 | 60.0% ± 0.0 | 65.0% ± 7.1 | 50.0% |" in text
    assert "| sg | -g1c0 +g1c1 | standard_gan | 1 (0) | 50.0% | 60.0% | 55.0% | 50.0% |" in text
    # Table 2: one row for the configuration, each cell mean ± sd; a single seed with its interval
    assert "| lf (-g1c0 +g1c1) | 2 (0, 1) | −0.650 ± 0.071 | +0.850 ± 0.071 |" in text
    assert "| identity | — | 0.970 [0.940, 1.000] | — |" in text
    assert "\n| lf-seed1 " not in text  # no row of its own in any table; a row of the per-seed table only
    # the per-seed table: every seed's number with its bootstrap interval
    assert "| lf | g1c0 | private | 1 | lf-seed1 | 70.0% [62.0, 78.0] |" in text

    _, seeds = _csv(out / "report_seeds.csv")
    lf_private = [(r["run"], r["seed"], r["test_bacc"], r["test_bacc_lo"], r["test_bacc_hi"], r["source"])
                  for r in seeds if r["configuration"] == "lf" and r["task"] == "g1c0"]
    assert lf_private == [("lf", "0", "0.6", "0.5", "0.7", "verify"),
                          ("lf-seed1", "1", "0.7", "0.62", "0.78", "verify")]
    _, table1 = _csv(out / "report_table1.csv")
    assert [(r["configuration"], r["runs"], r["seeds"], r["n_seeds"]) for r in table1][0] == ("lf", "lf lf-seed1",
                                                                                               "0 1", "2")
    assert float(table1[0]["test_bacc_sd"]) == pytest.approx(sd)
    _, table2 = _csv(out / "report_table2.csv")
    cell = next(r for r in table2 if (r["encoder"], r["task"]) == ("lf", "g1c1"))
    assert float(cell["test_bacc_mean"]) == pytest.approx(0.85) and cell["n_seeds"] == "2"
    _, ablation = _csv(out / "report_ablation.csv")
    assert [r["configuration"] for r in ablation] == ["lf", "sg", "lf-alpha"]
    assert float(ablation[0]["private_test_bacc_mean"]) == pytest.approx(0.65)
    assert float(ablation[0]["desirable_test_bacc_mean"]) == pytest.approx(0.85)


def test_one_seed_per_configuration_renders_as_before_and_drops_an_earlier_per_seed_table(two_seeds, tmp_path):
    out = tmp_path / "report"
    build_report(two_seeds, out, figures=False)
    assert (out / "report_seeds.csv").exists()
    single = [two_seeds[0], two_seeds[2], two_seeds[-1]]  # lf and sg: one seed each
    report = build_report(single, out, figures=False)
    assert not report["seeded"] and report["per_seed"] == []
    assert not (out / "report_seeds.csv").exists()
    text = (out / "report.md").read_text()
    assert "Per seed" not in text and "Training seeds" not in text and "| seeds |" not in text
    # today's layout: a row per run, accuracy with its Wilson interval, balanced with its bootstrap one
    assert "| lf | -g1c0 +g1c1 | label_flip | 62.5% | 60.0% | 60.0% ± " in text
    assert "| 60.0% | 60.0% [50.0, 70.0] | 50.0% |" in text
    assert "−0.600 ±0.15; bal. 0.600 [0.500, 0.700]" in text
    assert "†" not in text


def test_the_audit_worst_case_replaces_the_private_cell_and_both_numbers_are_kept(two_seeds, tmp_path):
    single = [two_seeds[0], two_seeds[-1], _audit(tmp_path / "audits" / "lf", "lf", "g1c0", "private", 0.80, 0.70,
                                                 0.90, plain=0.60)]
    report = build_report(single, tmp_path / "one", figures=False)
    (row,) = report["table1"]
    assert (row["verified_test_bacc"], row["audit_test_bacc"], row["audit_test_bacc_lo"]) == (0.60, 0.80, 0.70)
    assert row["audit_attack"] == "zoo" and row["audit_converged"] is False
    text = (tmp_path / "one" / "report.md").read_text()
    assert "| 80.0% [70.0, 90.0]† (verify 60.0% [50.0, 70.0]) |" in text
    assert "−0.810† ±0.12; bal. 0.800 [0.700, 0.900]" in text  # accuracy and balanced of the worst case
    assert "+0.900 ±0.10; bal. 0.900 [0.850, 0.950]" in text  # the desirable task is plain verification's
    assert "worst case of `privenc audit`" in text
    # the audit's own Identity reference (0.99) is not Table 2's Identity (0.97)
    identity = next(r for r in report["table2"] if r["encoder"] == "identity")
    assert identity["cells"]["g1c0"]["test_bacc"] == 0.97
    assert report["audits"][0]["plain_verify_test_bacc"] == 0.60

    # over seeds: the audited seed counts its worst case, the other its plain number
    report = build_report([*two_seeds, tmp_path / "audits"], tmp_path / "seeded", figures=False)
    lf = next(r for r in report["table1"] if r["configuration"] == "lf")
    assert lf["test_bacc_mean"] == pytest.approx(0.75) and lf["verify_test_bacc_mean"] == pytest.approx(0.65)
    assert lf["audit_test_bacc_mean"] == 0.80 and lf["audited_seeds"] == 1
    text = (tmp_path / "seeded" / "report.md").read_text()
    # one seed of two audited: the mean mixes a worst case and a plain number, and says so
    assert "| 75.0% ± 7.1† (1 of 2 seeds audited; verify 65.0% ± 7.1) |" in text
    assert "| −0.750 ± 0.071† (1 of 2 seeds audited) | +0.850 ± 0.071 |" in text
    assert "| lf | g1c0 | private | 0 | lf | 80.0% [70.0, 90.0]† (verify 60.0% [50.0, 70.0]) |" in text
    _, seeds = _csv(tmp_path / "seeded" / "report_seeds.csv")
    audited = next(r for r in seeds if (r["run"], r["task"]) == ("lf", "g1c0"))
    assert (audited["source"], audited["test_bacc"], audited["verify_test_bacc"], audited["audit_test_bacc"]) == (
        "audit", "0.8", "0.6", "0.8")


def test_an_audit_of_a_desirable_task_leaves_its_cell_to_verification(two_seeds, tmp_path):
    audit = _audit(tmp_path / "audits" / "lf", "lf", "g1c1", "desirable", 0.99, 0.98, 1.0, plain=0.9)
    report = build_report([two_seeds[0], two_seeds[-1], audit], tmp_path / "r", figures=False)
    assert report["audits"] == []
    assert "†" not in (tmp_path / "r" / "report.md").read_text()
