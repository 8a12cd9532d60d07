"""experiments/reproduce.py: every run it would train has a valid configuration; and
experiments/stop_rule.py's simulation of the audit's stopping rules."""

import importlib.util
from pathlib import Path

from privenc.config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "reproduce.py"


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_reproduction_run_is_a_valid_config():
    runs = _module().runs("g1c0", "g1c1", "g1c2", seeds=[0, 1])
    assert {"label_flip", "standard_gan", "negative_ce", "label_flip-seed1", "keep_g1c1_g1c2",
            "variance_none", "variance_batch", "variance_per_location_affine", "variance_per_location"} <= set(runs)
    for name, overrides in runs.items():
        config = load_config("demo", overrides)
        assert config.train.private == ["g1c0"], name
    assert load_config("demo", runs["keep_g1c1_g1c2"]).train.desirable == ["g1c1", "g1c2"]
    assert load_config("demo", runs["variance_batch"]).train.desirable == []
    assert load_config("demo", runs["variance_batch"]).encoder.norm == "batch"
    assert load_config("demo", runs["standard_gan"]).train.encoder_loss == "standard_gan"
    assert load_config("demo", runs["label_flip-seed1"]).train.seed == 1
    # Table 2 and the ablation are label-flip encoders even on a preset defaulting to another loss
    other = ["train.encoder_loss=\"standard_gan\""]
    for name in ("label_flip", "keep_g1c1_g1c2", "variance_batch", "variance_per_location"):
        assert load_config("demo", other + runs[name]).train.encoder_loss == "label_flip", name


def test_summarize_reports_the_spread_over_seeds(tmp_path, monkeypatch, capsys):
    import json
    import sys

    spec = importlib.util.spec_from_file_location("summarize", SCRIPT.with_name("summarize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = {"encoder": "lf", "task": "g1c0", "role": "private", "attacker": "paper", "n_test": 100, "saturated": True}
    records = [dict(base, seed=0, val_acc_best=0.70, test_acc_best=0.60),
               dict(base, seed=1, val_acc_best=0.75, test_acc_best=0.80)]
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / "verify.json").write_text(json.dumps(records))
    monkeypatch.setattr(sys, "argv", ["summarize.py", str(tmp_path)])
    module.main()
    row = capsys.readouterr().out.splitlines()[-1]
    # two attackers, mean 0.70, sd 0.141, the strongest by validation is seed 1 (0.80)
    assert row.startswith("| lf | g1c0 | private | 2 | 0.700 | 0.141 | 0.800 ± 0.0")


def test_reproduce_restarts_a_run_that_failed_before_its_first_checkpoint_and_resumes_the_others(
        tmp_path, monkeypatch):
    import sys

    module = _module()
    commands = []
    monkeypatch.setattr(module, "command", commands.append)
    out = tmp_path / "repro"
    failed = out / "runs" / "label_flip"
    (failed / "checkpoints").mkdir(parents=True)  # what a run killed before step checkpoint_every leaves
    (failed / "config.toml").write_text("")
    started = out / "runs" / "standard_gan"
    (started / "checkpoints").mkdir(parents=True)
    (started / "checkpoints" / "last.pt").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--out", str(out), "--tasks", "g1c0", "g1c1", "g1c2",
                                      "--only", "label_flip", "standard_gan", "--jobs", "1"])
    module.main()
    trains = {c[c.index("--out") + 1] if "--out" in c else c[c.index("--resume") + 1]: c for c in commands
              if c[1] == "train"}
    assert "--out" in trains[str(failed)] and "--config" in trains[str(failed)] and not failed.exists()
    # privenc train refuses --config with --resume (the run's own config.toml is what resumes)
    assert "--resume" in trains[str(started)] and "--config" not in trains[str(started)]


def _planned(monkeypatch, capsys, argv: list[str]) -> tuple[list[list[str]], str]:
    """The commands reproduce.py prints with --dry-run (each split as a shell would), and its output."""
    import shlex
    import sys

    monkeypatch.setattr(sys, "argv", ["reproduce.py", *argv, "--dry-run"])
    _module().main()
    out = capsys.readouterr().out
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("$ ")], out


def _option(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_dry_run_plans_every_table1_seed_its_grid_audits_and_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "repro"
    commands, text = _planned(monkeypatch, capsys, ["--out", str(out), "--tasks", "g1c0", "g1c1", "g1c2",
                                                    "--seeds", "0", "1", "--tables", "table1", "--audit-rounds", "1",
                                                    "--jobs", "3"])
    steps = [words[1] for words in commands]
    assert steps == ["train"] * 6 + ["grid"] + ["audit"] * 6 + ["report"]
    trains = {Path(_option(w, "--out")).name: w for w in commands if w[1] == "train"}
    # negative CE gets its seeds too; no Table 2 or ablation encoder is asked for
    assert set(trains) == {"label_flip", "standard_gan", "negative_ce",
                           "label_flip-seed1", "standard_gan-seed1", "negative_ce-seed1"}
    for name, words in trains.items():
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert f"train.seed={1 if name.endswith('-seed1') else 0}" in sets, name
        assert f"train.encoder_loss=\"{name.split('-')[0]}\"" in sets, name
    grid = commands[6]
    assert _option(grid, "--out") == str(out / "grid")
    assert {str(out / "runs" / name) for name in trains} | {"identity", "blur"} <= set(grid)
    audits = {Path(_option(w, "--out")).name: w for w in commands if w[1] == "audit"}
    assert set(audits) == set(trains)
    for name, words in audits.items():  # the run folder, its private task, the budget, the jobs
        assert words[2] == str(out / "runs" / name)
        assert [_option(words, flag) for flag in ("--task", "--max-rounds", "--jobs")] == ["g1c0", "1", "3"]
        assert _option(words, "--out") == str(out / "audits" / name)
    report = commands[-1]
    assert {str(out / "audits" / name) for name in trains} | {str(out / "grid")} <= set(report)
    assert _option(report, "--out") == str(out / "report")
    assert not out.exists() and "nothing was run" in text  # a dry run writes nothing


def test_without_audit_rounds_no_audit_is_planned_and_the_ablation_takes_its_own_seeds(tmp_path, monkeypatch,
                                                                                         capsys):
    commands, _ = _planned(monkeypatch, capsys, ["--out", str(tmp_path), "--tasks", "g1c0", "g1c1", "g1c2",
                                                 "--seeds", "0", "1", "--tables", "table2", "ablation",
                                                 "--ablation-seeds", "0"])
    assert "audit" not in [w[1] for w in commands]
    names = [Path(_option(w, "--out")).name for w in commands if w[1] == "train"]
    # Table 2 (-A +B, -A +B,C, -A variance only) for both seeds; the ablation's other norms for seed 0 only
    assert sorted(names) == sorted(["label_flip", "keep_g1c1_g1c2", "variance_per_location",
                                    "label_flip-seed1", "keep_g1c1_g1c2-seed1", "variance_per_location-seed1",
                                    "variance_none", "variance_batch", "variance_per_location_affine"])


def test_attribute_tasks_give_folder_names_and_two_tasks_leave_out_the_c_row(tmp_path, monkeypatch, capsys):
    runs = _module().runs("attribute:gender", "attribute:smiling", "attribute:expression", seeds=[0])
    assert "keep_attribute-smiling_attribute-expression" in runs
    assert all(":" not in name and "/" not in name for name in runs)
    commands, text = _planned(monkeypatch, capsys, ["--out", str(tmp_path), "--tasks", "attribute:gender",
                                                    "attribute:smiling", "--tables", "table2"])
    names = [Path(_option(w, "--out")).name for w in commands if w[1] == "train"]
    assert names == ["label_flip", "variance_per_location"]
    assert "-A +B,C encoder of Table 2 is left out" in text
    assert _option(commands[-2], "--tasks") == "attribute:gender"  # the grid verifies both tasks


def test_also_adds_a_column_that_no_encoder_trains_for(tmp_path, monkeypatch, capsys):
    commands, text = _planned(monkeypatch, capsys, ["--out", str(tmp_path), "--tasks", "attribute:gender",
                                                    "attribute:smiling", "--also", "attribute:expression",
                                                    "--tables", "table1", "table2"])
    for words in commands:  # no run keeps or hides expression: it stays out of every --set
        if words[1] == "train":
            assert not any("expression" in w for w in words), words
    grid = next(w for w in commands if w[1] == "grid")
    tasks = grid[grid.index("--tasks") + 1:grid.index("--out")]
    assert tasks == ["attribute:gender", "attribute:smiling", "attribute:expression"]
    assert "-A +B,C encoder of Table 2 is left out" in text


def test_reproduce_refuses_a_single_task_and_an_unknown_run(tmp_path, monkeypatch, capsys):
    import sys

    import pytest

    for argv, message in ((["--tasks", "g1c0"], "at least A (private) and B"),
                          (["--tasks", "g1c0", "g1c1", "--also", "g1c1"], "list a task twice"),
                          (["--tasks", "g1c0", "g1c1", "--only", "keep_g1c1_g1c2"], "unknown runs")):
        monkeypatch.setattr(sys, "argv", ["reproduce.py", "--out", str(tmp_path), *argv, "--dry-run"])
        with pytest.raises(SystemExit):
            _module().main()
        assert message in capsys.readouterr().err


def test_collapse_reads_the_values_the_tanh_receives_on_every_image_of_the_split(finished_run, monkeypatch,
                                                                                 capsys):
    import sys

    import pytest
    import torch

    from privenc import runs
    from privenc.data import prepare
    from privenc.data.transforms import BatchTransform

    spec = importlib.util.spec_from_file_location("collapse", SCRIPT.with_name("collapse.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pre, out = module.pre_tanh_outputs(finished_run, "test", batch_size=5)  # batches of 5: several
    config = runs.read_config(finished_run)
    test = prepare(config.data, ["g1c0", "g1c1"], run_dir=finished_run).uint8_dataset("test")
    with torch.no_grad():
        encoded = runs.read_encoder(finished_run).module.eval()(
            BatchTransform(config.data, augment=False)(torch.stack([image for image, _ in test])))
    assert len(pre) == len(test) > 5
    assert torch.allclose(out, encoded, atol=1e-6)
    assert not torch.allclose(pre, out, atol=1e-3)  # before the tanh, not after it
    monkeypatch.setattr(sys, "argv", ["collapse.py", str(finished_run), str(finished_run.parent)])
    with pytest.raises(SystemExit):
        module.main()
    assert "not a finished run folder" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["collapse.py", str(finished_run)])
    module.main()
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {finished_run.name} | {len(test)} | ") and row.count("%") == 5


def test_the_stopping_rule_simulation_tells_selection_from_a_real_rise():
    import argparse

    import numpy as np

    spec = importlib.util.spec_from_file_location("stop_rule", SCRIPT.parent / "stop_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(sims=40, margin=1.0, p0=0.75, round0=3, round1=32)
    rng = np.random.default_rng(0)
    # attackers that all copy one draw per image are one attacker: nothing rises, every rule stops
    assert module.simulate(300, 1.0, 0.0, args, rng) == (1.0, 1.0, 1.0)
    # a 20-point better family is found by every rule: none stops
    assert module.simulate(300, 0.0, 20.0, args, rng) == (0.0, 0.0, 0.0)
    # independent equal attackers: the best validation score rises by selection, the confirmed one does not
    by_validation, _, both_ways = module.simulate(864, 0.0, 0.0, args, rng)
    assert by_validation < 0.5 < both_ways
