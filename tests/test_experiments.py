"""experiments/reproduce.py: every run it would train has a valid configuration."""

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
